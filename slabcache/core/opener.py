"""Opening a store: lock, recover, create or verify, then assemble the parts.

Everything here runs with the store directory locked exclusively, so two
processes never create or validate one store at once; the shared lock on
the ``lock`` file is kept for the handle's life.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass

from ..device import Engine, make_engine
from ..device.slabfile import (
    SlotRecords, check_geometry, create_slab, read_header_bytes, read_slab_header, write_header_bytes,
)
from ..device.storedir import OpenLock, recover_interrupted
from ..errors import ConfigError, CorruptStoreError
from ..format.header import FORMAT_VERSION, Geometry, header_version, pack_header
from ..format.layout import SLAB, StorePaths, modes
from ..index import Index, default_map_size
from ..index.owner import is_v1, pid_of
from ..index.policy import Policy, make_policy
from .options import StoreOptions

log = logging.getLogger(__name__)


@dataclass
class Opened:
    """What an open store is made of (owned by the SlabStore built from it)."""

    opts: StoreOptions
    paths: StorePaths
    lock: OpenLock
    index: Index
    engine: Engine
    records: SlotRecords
    geometry: Geometry
    creation_id: bytes
    policy: Policy


def open_store(opts: StoreOptions) -> Opened:
    """Open (creating if needed) the store ``opts`` describes.

    Raises ConfigError for bad paths or settings, CorruptStoreError for a
    damaged store, StorageFullError when the slab cannot be preallocated.
    """
    paths = StorePaths(opts.path)
    _prepare_directory(paths, opts)
    lock = OpenLock(paths, opts.readonly, modes(opts.share_group)[0])
    try:
        return _open_locked(opts, paths, lock)
    except BaseException:
        lock.close()
        raise
    finally:
        lock.release_directory()


def _prepare_directory(paths: StorePaths, opts: StoreOptions) -> None:
    path = paths.root
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{path} exists and is not a directory; give a directory for the store")
    if opts.readonly:
        if not os.path.exists(paths.slab):
            raise ConfigError(f"no slabcache store at {path} (no {SLAB} file)")
        return
    _, dir_mode = modes(opts.share_group)
    if not os.path.exists(path):
        try:
            os.makedirs(path, dir_mode)
            os.chmod(path, dir_mode)  # exactly, whatever the umask
        except OSError as exc:
            raise ConfigError(f"cannot create store directory {path}: {exc.strerror}") from exc
    elif not opts.trust_directory:
        _check_ownership(path, opts.share_group)
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"store directory {path} is not writable; fix its permissions or choose another path")


def _check_ownership(path: str, share_group: bool) -> None:
    """Refuse a store directory another user owns, or one that others (or,
    unless the store is shared with its group, the group) can write to:
    whoever can write there can read the cache and replace the slab."""
    st = os.stat(path)
    if st.st_uid != os.geteuid():
        raise ConfigError(
            f"store directory {path} belongs to uid {st.st_uid}, not to this process (uid "
            f"{os.geteuid()}); use a directory you own, or pass trust_directory=True if that "
            "user is trusted"
        )
    writable_by = st.st_mode & (0o002 if share_group else 0o022)
    if writable_by:
        who = "others" if writable_by & 0o002 else "its group"
        raise ConfigError(
            f"store directory {path} is writable by {who} (mode {st.st_mode & 0o777:o}); "
            f"chmod {'o-w' if who == 'others' else 'g-w'} it, or pass trust_directory=True"
            f"{'' if share_group else ' (or share_group=True to share the store with its group)'}"
        )


def _open_locked(opts: StoreOptions, paths: StorePaths, lock: OpenLock) -> Opened:
    if not opts.readonly:
        recover_interrupted(paths)
    requested = make_policy(opts.policy) if opts.policy is not None else None
    created = False
    if os.path.exists(paths.slab):
        g, creation_id = read_slab_header(paths.slab)
        check_geometry(g, paths.root, opts.capacity_bytes, opts.slot_bytes)
        _check_index_present(paths)
    else:
        if opts.capacity_bytes is None or opts.slot_bytes is None:
            raise ConfigError(
                f"no store at {paths.root} yet: pass capacity_bytes and slot_bytes to create one"
            )
        # An index without a slab is a creation that never finished.
        shutil.rmtree(paths.index, ignore_errors=True)
        g, creation_id = create_slab(paths.slab_creating, opts.capacity_bytes, opts.slot_bytes,
                                     modes(opts.share_group)[0])
        created = True

    try:
        file_mode, dir_mode = modes(opts.share_group)
        index = Index.acquire(paths.index, map_size=opts.index_map_bytes or default_map_size(g.slot_count),
                              readonly=opts.readonly, create=not opts.readonly,
                              file_mode=file_mode, dir_mode=dir_mode)
    except BaseException:
        if created:
            os.unlink(paths.slab_creating)
        raise
    try:
        if created:
            with index.write() as t:
                t.init_store(creation_id, pack_header(g, creation_id), requested)
            os.rename(paths.slab_creating, paths.slab)
        policy = _settle_policy(index, requested, paths.root, opts.readonly)
        with index.read() as t:
            if t.creation_id() != creation_id:
                raise CorruptStoreError(
                    f"the index of {paths.root} belongs to another slab (creation ids differ); "
                    f"run `slabcache fsck {paths.root} --rebuild-index`"
                )
        if not created and not opts.readonly:
            _upgrade(paths, index, g, creation_id)
        engine = make_engine(opts.io, paths.slab, g)
    except BaseException:
        index.release()
        raise
    if opts.engine_wrapper is not None:
        engine = opts.engine_wrapper(engine)
    records = SlotRecords(paths.slab, g, writable=not opts.readonly, direct=opts.io == "direct")
    return Opened(opts, paths, lock, index, engine, records, g, creation_id, policy)


def _check_index_present(paths: StorePaths) -> None:
    """Raise CorruptStoreError when the index is missing, ConfigError when
    it is there but this user may not read it."""
    try:
        os.stat(paths.lmdb_data)
    except FileNotFoundError:
        raise CorruptStoreError(
            f"the index of {paths.root} is missing; run `slabcache fsck {paths.root} "
            "--rebuild-index` to rebuild it from the slab"
        ) from None
    except PermissionError:
        owner = os.stat(paths.index).st_uid
        raise ConfigError(
            f"the index of {paths.root} cannot be read by uid {os.geteuid()}: {paths.index} "
            f"belongs to uid {owner} with mode {os.stat(paths.index).st_mode & 0o777:o}; give it "
            f"back to the store's owner (chown -R --reference={paths.slab} {paths.index})"
        ) from None


def _upgrade(paths: StorePaths, index: Index, g, creation_id: bytes) -> None:
    """Bring a store of an older format version to this one: the layout
    is the same, but processes of version 1 judge owners by pid and start
    time and would take this version's reservations and pins for a dead
    process's.  So it is done only while none of them has the store open,
    and afterwards they refuse it (a newer version)."""
    if header_version(read_header_bytes(paths.slab)) >= FORMAT_VERSION:
        return
    with index.read() as t:
        older = sorted({pid_of(w) for w, _t, _wr in t.owners() if is_v1(w) and t.alive(w)})
    if older:
        raise ConfigError(
            f"the store at {paths.root} is open by an older slabcache (pids {older}), which "
            "cannot share it with this version; stop those processes or upgrade their slabcache, "
            "then open it again"
        )
    header = pack_header(g, creation_id)
    write_header_bytes(paths.slab, header)
    with index.write(durable=True) as t:
        t.set_header_copy(header)
    log.info("store %s: upgraded to format version %d", paths.root, FORMAT_VERSION)


def _settle_policy(index: Index, requested: Policy | None, path: str, readonly: bool) -> Policy:
    """The policy the handle uses: the store's own, or ``requested`` after
    re-ordering the store for it (only while nobody else has it open)."""
    with index.read() as t:
        stored = t.policy()
        others = [o for o in t.owners() if t.alive(o[0])]
    if requested is None or requested.name == stored.name:
        return stored
    if readonly or others:
        raise ConfigError(
            f"store at {path} uses policy {stored.name!r} and is open elsewhere "
            f"(pids {sorted({pid_of(o[0]) for o in others})}); open it with "
            f"policy={stored.name!r} or None, or change the policy while no one else has it open"
        )
    with index.write() as t:
        t.rebuild_order(requested)
        t.set_policy(requested)
    log.info("store %s: eviction policy changed from %s to %s", path, stored.name, requested.name)
    return requested
