"""slabcache inside a real LMCache 0.5.6 engine, on CPU.

These need lmcache==0.5.6 (``./tools/bootstrap.sh --with-lmcache`` installs
it; CI does). A CPU stand-in replaces the GPU connector.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

lmcache = pytest.importorskip(
    "lmcache", reason="lmcache==0.5.6 is not installed: run ./tools/bootstrap.sh --with-lmcache")

from slabcache import ConfigError, SlabStore  # noqa: E402
from slabcache.integrations.lmcache import canonical_key  # noqa: E402

from tests.integrations import lmcache_harness as h  # noqa: E402

pytestmark = pytest.mark.lmcache


@pytest.fixture
def disk(tmp_path):
    return str(tmp_path / "kv")


def _store_prompt(eng, n_tokens=5 * h.CHUNK + 7, seed=0):
    tokens, kv = h.prompt(n_tokens, seed)
    eng.store(tokens, kv=kv)
    h.wait_stored(eng, -(-n_tokens // h.CHUNK))
    return tokens, kv


def test_store_lookup_retrieve_sync(disk):
    cfg = h.config(disk)
    eng = h.engine(cfg)
    try:
        base = h.cpu_usage(eng)
        tokens, kv = _store_prompt(eng)
        assert h.cpu_usage(eng) == base  # the written objects were released
        assert eng.lookup(tokens, pin=True, lookup_id="r1") == len(tokens)
        assert h.pins(eng) == [1] * 6
        out = torch.zeros_like(kv)
        mask = eng.retrieve(tokens, kv=out)
        assert int(mask.sum()) == len(tokens)
        assert torch.equal(out, kv)
        eng.lookup_unpin("r1")
        assert h.pins(eng) == [0] * 6
        assert h.cpu_usage(eng) == base  # nothing leaked by the retrieve
        st = h.backend(eng).store.stats()
        assert st["slots_used"] == 6 and st["hits"] == 6
    finally:
        h.destroy(cfg)


def test_store_lookup_retrieve_async(disk):
    cfg = h.config(disk, async_loading=True)
    eng = h.engine(cfg)
    try:
        base = h.cpu_usage(eng)
        tokens, kv = _store_prompt(eng, seed=1)
        eng.async_lookup_and_prefetch("r2", tokens, pin=True)
        h.wait_loaded(eng, "r2")
        assert eng.storage_manager.async_lookup_server.responses["r2"] == len(tokens)
        assert h.pins(eng) == [0] * 6  # released by the backend after the prefetch
        out = torch.zeros_like(kv)
        mask = eng.retrieve(tokens, kv=out, req_id="r2")
        assert int(mask.sum()) == len(tokens) and torch.equal(out, kv)
        assert h.cpu_usage(eng) == base
    finally:
        h.destroy(cfg)


def test_partial_hit_is_a_prefix(disk):
    cfg = h.config(disk)
    eng = h.engine(cfg)
    try:
        tokens, kv = _store_prompt(eng, n_tokens=4 * h.CHUNK, seed=2)
        b = h.backend(eng)
        keys = [canonical_key(k) for _, _, k in eng.token_database.process_tokens(tokens=tokens)]
        assert sorted(keys) == sorted(b.store.keys())
        b.store.remove(keys[2])  # the third chunk goes missing
        assert eng.lookup(tokens) == 2 * h.CHUNK
        out = torch.zeros_like(kv)
        mask = eng.retrieve(tokens, kv=out)
        assert int(mask.sum()) == 2 * h.CHUNK
        assert torch.equal(out[:, :, :2 * h.CHUNK], kv[:, :, :2 * h.CHUNK])
    finally:
        h.destroy(cfg)


def test_a_damaged_chunk_is_a_miss_and_the_retrieve_stops_before_it(disk):
    """Retrieves read through the store's batch path: a chunk whose bytes
    fail their checksum is never handed to the engine."""
    cfg = h.config(disk)
    eng = h.engine(cfg)
    try:
        tokens, kv = _store_prompt(eng, n_tokens=4 * h.CHUNK, seed=5)
        b = h.backend(eng)
        keys = [canonical_key(k) for _, _, k in eng.token_database.process_tokens(tokens=tokens)]
        e = b.store.entry(keys[2])
        with open(os.path.join(b.path, "slab"), "r+b") as f:  # one bit of the third chunk
            f.seek(b.store.geometry.slot_offset(e.slot) + e.length // 2)
            byte = f.read(1)
            f.seek(b.store.geometry.slot_offset(e.slot) + e.length // 2)
            f.write(bytes([byte[0] ^ 0x01]))
        b.store.engine.drop_cache()
        out = torch.zeros_like(kv)
        mask = eng.retrieve(tokens, kv=out)
        assert int(mask.sum()) == 2 * h.CHUNK
        assert torch.equal(out[:, :, :2 * h.CHUNK], kv[:, :, :2 * h.CHUNK])
        assert not out[:, :, 2 * h.CHUNK:].any()
        st = b.store.stats()
        assert st["checksum_failures"] == 1 and keys[2] not in b.store
    finally:
        h.destroy(cfg)


def test_warm_restart_serves_the_prompt(disk):
    cfg = h.config(disk)
    eng = h.engine(cfg)
    tokens, kv = _store_prompt(eng, seed=3)
    h.destroy(cfg)
    cfg2 = h.config(disk)  # a new engine, a new instance id, the same path
    eng2 = h.engine(cfg2)
    try:
        assert eng2.lookup(tokens) == len(tokens)
        out = torch.zeros_like(kv)
        assert int(eng2.retrieve(tokens, kv=out).sum()) == len(tokens)
        assert torch.equal(out, kv)
    finally:
        h.destroy(cfg2)


RESTART_CHILD = """
import os, sys, torch
sys.path.insert(0, os.getcwd())
from tests.integrations import lmcache_harness as h
path, phase = sys.argv[1], sys.argv[2]
cfg = h.config(path)
eng = h.engine(cfg)
tokens, kv = h.prompt(3 * h.CHUNK + 5, seed=11)
if phase == "store":
    eng.store(tokens, kv=kv)
    h.wait_stored(eng, 4)
    print("stored")
else:
    out = torch.zeros_like(kv)
    print("hit", eng.lookup(tokens), int(eng.retrieve(tokens, kv=out).sum()), torch.equal(out, kv))
h.destroy(cfg)
os._exit(0)
"""


def _child(code, *args, extra_env=None):
    env = dict(os.environ, PYTHONHASHSEED="0", LMCACHE_TRACK_USAGE="false", **(extra_env or {}))
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=env, cwd=os.getcwd(), timeout=240)


def test_warm_restart_across_processes(disk):
    r = _child(RESTART_CHILD, disk, "store")
    assert r.returncode == 0 and "stored" in r.stdout, r.stderr[-3000:]
    r = _child(RESTART_CHILD, disk, "load")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"hit {3 * h.CHUNK + 5} {3 * h.CHUNK + 5} True" in r.stdout


WORKER_CHILD = """
import os, sys, torch
sys.path.insert(0, os.getcwd())
from tests.integrations import lmcache_harness as h
path, wid = sys.argv[1], int(sys.argv[2])
cfg = h.config(path)
eng = h.engine(cfg, h.metadata(worker_id=wid, world_size=2))
ok = True
for r in range(3):
    tokens, kv = h.prompt(4 * h.CHUNK, seed=100 * wid + r)
    eng.store(tokens, kv=kv)
for r in range(3):
    tokens, kv = h.prompt(4 * h.CHUNK, seed=100 * wid + r)
    h.wait_stored(eng, 4 * (r + 1))
    out = torch.zeros_like(kv)
    ok &= eng.lookup(tokens) == len(tokens)
    ok &= bool(eng.retrieve(tokens, kv=out).sum() == len(tokens)) and torch.equal(out, kv)
print("worker", wid, ok)
h.destroy(cfg)
os._exit(0)
"""


def test_two_workers_share_one_path(disk):
    env = dict(os.environ, PYTHONHASHSEED="0", LMCACHE_TRACK_USAGE="false")
    procs = [subprocess.Popen([sys.executable, "-c", WORKER_CHILD, disk, str(w)], env=env,
                              cwd=os.getcwd(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for w in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    for w, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, err[-3000:]
        assert f"worker {w} True" in out, err[-3000:]
    with SlabStore.open(disk) as s:
        keys = s.keys()
        assert len(keys) == 24
        assert sum("@2@0@" in k for k in keys) == 12 and sum("@2@1@" in k for k in keys) == 12
        st = s.stats()
        assert st["slots_used"] + st["slots_free"] == st["slots_total"]


def test_loaded_from_yaml_file(disk, tmp_path, monkeypatch):
    from lmcache.v1.config import load_engine_config_with_overrides

    yml = tmp_path / "lmcache.yaml"
    yml.write_text(textwrap.dedent(f"""
        chunk_size: {h.CHUNK}
        local_cpu: false
        max_local_cpu_size: 0.05
        max_local_disk_size: 0.01
        save_unfull_chunk: true
        cache_policy: LFU
        storage_plugins: ["LocalDiskBackend"]
        extra_config:
          storage_plugin.LocalDiskBackend.module_path: slabcache.integrations.lmcache
          storage_plugin.LocalDiskBackend.class_name: SlabCacheBackend
          slabcache.paths: "file://{disk}/"
          use_odirect: true
          disk_io_threads: 2
    """))
    monkeypatch.setenv("LMCACHE_CONFIG_FILE", str(yml))
    cfg = load_engine_config_with_overrides()
    cfg.lmcache_instance_id = "yaml-test"
    eng = h.engine(cfg)
    try:
        b = h.backend(eng)
        st = b.store.stats()
        assert (st["io"], st["policy"], st["io_threads"]) == ("direct", "lfu", 2)
        assert b.path == os.path.abspath(disk)
        tokens, kv = _store_prompt(eng, n_tokens=2 * h.CHUNK, seed=4)
        out = torch.zeros_like(kv)
        assert int(eng.retrieve(tokens, kv=out).sum()) == 2 * h.CHUNK and torch.equal(out, kv)
    finally:
        h.destroy(cfg)


def test_loaded_from_environment(disk, monkeypatch):
    from lmcache.v1.config import load_engine_config_with_overrides

    monkeypatch.delenv("LMCACHE_CONFIG_FILE", raising=False)
    for k, v in {
        "LMCACHE_CHUNK_SIZE": str(h.CHUNK), "LMCACHE_LOCAL_CPU": "False",
        "LMCACHE_MAX_LOCAL_CPU_SIZE": "0.05", "LMCACHE_MAX_LOCAL_DISK_SIZE": "0.01",
        "LMCACHE_STORAGE_PLUGINS": "LocalDiskBackend", "LMCACHE_CACHE_POLICY": "FIFO",
        "LMCACHE_EXTRA_CONFIG": json.dumps({**h.PLUGIN, "slabcache.paths": disk}),
    }.items():
        monkeypatch.setenv(k, v)
    cfg = load_engine_config_with_overrides()
    cfg.lmcache_instance_id = "env-test"
    eng = h.engine(cfg)
    try:
        st = h.backend(eng).store.stats()
        assert (st["io"], st["policy"]) == ("mmap", "fifo")
        # 0.01 GB over one path, slots of one full chunk of this model's KV.
        chunk = h.LAYERS * 2 * h.CHUNK * h.HIDDEN * 2
        assert st["slot_bytes"] == chunk and st["slots_total"] == int(0.01 * 1024 ** 3) // chunk
    finally:
        h.destroy(cfg)


def test_several_paths_shard_by_device(tmp_path):
    from slabcache.integrations.lmcache import SlabCacheBackend

    paths = [str(tmp_path / f"nvme{i}") for i in range(2)]
    cfg = h.config(paths[0])
    cfg.extra_config["slabcache.paths"] = ",".join(f"file://{p}/" for p in paths)
    cfg.max_local_disk_size = 0.02
    for dev, want in [("cpu", 0), ("cuda:1", 1), ("cuda:2", 0)]:
        b = SlabCacheBackend(config=cfg, dst_device=dev, metadata=h.metadata(),
                             local_cpu_backend=None, loop=None)
        try:
            assert b.path == paths[want]
            assert b.store.stats()["capacity_bytes"] <= int(0.01 * 1024 ** 3)  # half the total each
        finally:
            b.close()


@pytest.mark.parametrize("change,fragment", [
    (dict(extra={"slabcache.paths": ""}), "no disk path configured"),
    (dict(size=0), "max_local_disk_size is 0"),
    (dict(extra={"disk_io_threads": 0}), "disk_io_threads must be a whole number from 1 to 256"),
    (dict(extra={"disk_io_threads": "many"}), "disk_io_threads must be a whole number"),
    (dict(extra={"slabcache.durability": "paranoid"}), "for slabcache.durability; use one of fast, strict"),
    (dict(extra={"use_odirect": "yes"}), "use_odirect must be true or false"),
    (dict(extra={"slabcache.checksum": "maybe"}), "slabcache.checksum must be true or false"),
    (dict(extra={"slabcache.slot_bytes": 1 << 40}), "less than one slot"),
    (dict(extra={"slabcache.use_refresh_seconds": "soon"}), "slabcache.use_refresh_seconds must be a number"),
    (dict(extra={"slabcache.use_refresh_seconds": -1}), "slabcache.use_refresh_seconds must be a number"),
])
def test_bad_settings_fail_loudly(disk, change, fragment, caplog):
    from slabcache.integrations.lmcache import SlabCacheBackend

    cfg = h.config(disk)
    cfg.extra_config.update(change.get("extra", {}))
    if "size" in change:
        cfg.max_local_disk_size = change["size"]
    with pytest.raises(ConfigError, match=fragment):
        SlabCacheBackend(config=cfg, dst_device="cpu", metadata=h.metadata(),
                         local_cpu_backend=None, loop=None)
    assert any(r.levelname == "ERROR" and "WITHOUT a disk tier" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("spelling,want", [("false", False), ("FALSE", False), ("0", False),
                                           (False, False), ("true", True), ("1", True), (True, True)])
def test_boolean_settings_take_lmcache_spellings(disk, spelling, want):
    from slabcache.integrations.lmcache import SlabCacheBackend

    cfg = h.config(disk)
    cfg.extra_config.update({"slabcache.checksum": spelling, "use_odirect": spelling})
    b = SlabCacheBackend(config=cfg, dst_device="cpu", metadata=h.metadata(),
                         local_cpu_backend=None, loop=None)
    try:
        st = b.store.stats()
        assert st["checksum"] is want and st["io"] == ("direct" if want else "mmap")
    finally:
        b.close()


@pytest.mark.parametrize("given,want", [(None, 1.0), (0, 0.0), ("2.5", 2.5)])
def test_reads_move_chunks_in_the_order_at_most_once_a_refresh_window(disk, given, want):
    from slabcache.integrations.lmcache import SlabCacheBackend

    cfg = h.config(disk)
    if given is not None:
        cfg.extra_config["slabcache.use_refresh_seconds"] = given
    b = SlabCacheBackend(config=cfg, dst_device="cpu", metadata=h.metadata(),
                         local_cpu_backend=None, loop=None)
    try:
        assert b.store.options.use_refresh_seconds == want
    finally:
        b.close()


def test_entries_show_lmcache_shapes_and_usage_reaches_its_monitor(disk, capsys):
    from lmcache.observability import LMCStatsMonitor

    from slabcache.cli import main

    cfg = h.config(disk)
    eng = h.engine(cfg)
    try:
        _store_prompt(eng, n_tokens=2 * h.CHUNK)
        assert main(["ls", disk, "--json"]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert [r["dtypes"] for r in rows] == [["bfloat16"]] * 2
        assert [r["shapes"] for r in rows] == [[[2, h.LAYERS, h.CHUNK, h.HIDDEN]]] * 2
        st = h.backend(eng).store.stats()
        assert LMCStatsMonitor.GetOrCreate().local_storage_usage_bytes == 2 * st["slot_bytes"]
    finally:
        h.destroy(cfg)


def test_canonical_keys_are_distinct():
    from lmcache.utils import CacheEngineKey

    def key(h_, **kw):
        return CacheEngineKey(model_name=kw.get("model", "org/model-7b"), world_size=1, worker_id=0,
                              chunk_hash=h_, dtype=torch.bfloat16,
                              request_configs=kw.get("cfg"))

    a, b = key(0xAB), key(b"\xab")
    assert canonical_key(a) != canonical_key(b)
    assert canonical_key(key(5)) == canonical_key(key(5))
    assert "org/model-7b" in canonical_key(a)
    tagged = key(5, cfg={"lmcache.tag.user": "alice"})
    assert canonical_key(tagged) != canonical_key(key(5))


def test_allocator_close_waits_for_queued_puts(disk):
    """LMCache closes its CPU allocator before storage plugins; a put still
    reading an allocator object must finish first (it read freed memory)."""
    import threading

    from slabcache.device import EngineWrapper

    cfg = h.config(disk)
    eng = h.engine(cfg)
    b = h.backend(eng)
    gate = threading.Event()

    class Held(EngineWrapper):
        def write(self, slot, parts, hashed=False):
            assert gate.wait(30)
            return super().write(slot, parts, hashed)

    b.store._writer.engine = Held(b.store._writer.engine)  # writes wait for the gate
    tokens, kv = h.prompt(2 * h.CHUNK)
    eng.store(tokens, kv=kv)
    assert b.pending_puts() == 2
    closer = threading.Thread(target=b.local_cpu_backend.close)
    closer.start()
    closer.join(0.3)
    assert closer.is_alive()  # the allocator is not freed under the queued puts
    gate.set()
    closer.join(30)
    assert not closer.is_alive() and b.pending_puts() == 0 and len(b.store) == 2
    h.destroy(cfg)
