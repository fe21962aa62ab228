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
from ..device.slabfile import SlotRecords, check_geometry, create_slab, read_slab_header
from ..device.storedir import OpenLock, recover_interrupted
from ..errors import ConfigError, CorruptStoreError
from ..format.header import Geometry, pack_header
from ..format.layout import SLAB, StorePaths
from ..index import Index, default_map_size
from ..index import owner as owners
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
    _prepare_directory(paths, opts.readonly)
    lock = OpenLock(paths, opts.readonly)
    try:
        return _open_locked(opts, paths, lock)
    except BaseException:
        lock.close()
        raise
    finally:
        lock.release_directory()


def _prepare_directory(paths: StorePaths, readonly: bool) -> None:
    path = paths.root
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{path} exists and is not a directory; give a directory for the store")
    if readonly:
        if not os.path.exists(paths.slab):
            raise ConfigError(f"no slabcache store at {path} (no {SLAB} file)")
        return
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create store directory {path}: {exc.strerror}") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"store directory {path} is not writable; fix its permissions or choose another path")


def _open_locked(opts: StoreOptions, paths: StorePaths, lock: OpenLock) -> Opened:
    if not opts.readonly:
        recover_interrupted(paths)
    requested = make_policy(opts.policy) if opts.policy is not None else None
    created = False
    if os.path.exists(paths.slab):
        g, creation_id = read_slab_header(paths.slab)
        check_geometry(g, paths.root, opts.capacity_bytes, opts.slot_bytes)
        if not os.path.exists(paths.lmdb_data):
            raise CorruptStoreError(
                f"the index of {paths.root} is missing; run `slabcache fsck {paths.root} "
                "--rebuild-index` to rebuild it from the slab"
            )
    else:
        if opts.capacity_bytes is None or opts.slot_bytes is None:
            raise ConfigError(
                f"no store at {paths.root} yet: pass capacity_bytes and slot_bytes to create one"
            )
        # An index without a slab is a creation that never finished.
        shutil.rmtree(paths.index, ignore_errors=True)
        g, creation_id = create_slab(paths.slab_creating, opts.capacity_bytes, opts.slot_bytes)
        created = True

    try:
        index = Index.acquire(paths.index, map_size=opts.index_map_bytes or default_map_size(g.slot_count),
                              readonly=opts.readonly, create=not opts.readonly)
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
        engine = make_engine(opts.io, paths.slab, g)
    except BaseException:
        index.release()
        raise
    if opts.engine_wrapper is not None:
        engine = opts.engine_wrapper(engine)
    records = SlotRecords(paths.slab, g, writable=not opts.readonly)
    return Opened(opts, paths, lock, index, engine, records, g, creation_id, policy)


def _settle_policy(index: Index, requested: Policy | None, path: str, readonly: bool) -> Policy:
    """The policy the handle uses: the store's own, or ``requested`` after
    re-ordering the store for it (only while nobody else has it open)."""
    with index.read() as t:
        stored = t.policy()
        others = [o for o in t.owners() if owners.is_alive(o[0])]
    if requested is None or requested.name == stored.name:
        return stored
    if readonly or others:
        raise ConfigError(
            f"store at {path} uses policy {stored.name!r} and is open elsewhere "
            f"(pids {sorted({owners.pid_of(o[0]) for o in others})}); open it with "
            f"policy={stored.name!r} or None, or change the policy while no one else has it open"
        )
    with index.write() as t:
        t.rebuild_order(requested)
        t.set_policy(requested)
    log.info("store %s: eviction policy changed from %s to %s", path, stored.name, requested.name)
    return requested
