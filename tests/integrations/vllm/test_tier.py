"""SlabCacheTier against vLLM's SecondaryTierManager contract (vLLM 0.32)."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from .conftest import VLLM_MISSING

pytest.importorskip("vllm", reason=VLLM_MISSING)
from vllm.v1.kv_offload.base import Locality, LookupResult, Medium  # noqa: E402

from slabcache import ConfigError, LayoutMismatchError, SlabStore  # noqa: E402
from slabcache.runtime.workers import Priority  # noqa: E402

from slabcache.testing.vllm_tier import BLOCK, Primary, job, key, offloading_spec, wait_jobs  # noqa: E402


def test_store_then_load_copies_the_exact_bytes(primary, make_tier):
    tier = make_tier(primary)
    assert tier.medium is Medium.STORAGE
    data = primary.fill(range(8), seed=1)
    keys = [key(i) for i in range(8)]
    assert all(tier.lookup(k, None) is LookupResult.MISS for k in keys)
    store = job(keys, range(8))
    tier.submit_store(store)
    res = wait_jobs(tier, [store.job_id])[store.job_id]
    assert res.success and res.transfer_bytes == 8 * BLOCK and res.transfer_time > 0
    assert all(tier.lookup(k, None) is LookupResult.HIT for k in keys)

    primary.array[:] = 0
    load = job(keys[::-1], range(20, 28))  # into other slots, in another order
    tier.submit_load(load)
    res = wait_jobs(tier, [load.job_id])[load.job_id]
    assert res.success and res.successful_keys is None and res.transfer_bytes == 8 * BLOCK
    for k, c in zip(keys[::-1], range(20, 28)):
        assert primary.array[c].tobytes() == data[keys.index(k)]
    st = tier.stats()
    assert st["stored_blocks"] == 8 and st["loaded_blocks"] == 8 and st["lookup_hits"] == 8


def test_blocks_already_held_are_not_rewritten(primary, make_tier):
    tier = make_tier(primary)
    primary.fill([0], seed=2)
    tier.submit_store(first := job([key(1)], [0]))
    wait_jobs(tier, [first.job_id])
    before = tier._stores[0].stats()["puts"]
    primary.fill([0], seed=3)  # different bytes offered under the same key
    tier.submit_store(again := job([key(1)], [0]))
    assert wait_jobs(tier, [again.job_id])[again.job_id].success
    assert tier._stores[0].stats()["puts"] == before
    primary.array[5] = 0
    tier.submit_load(load := job([key(1)], [5]))
    wait_jobs(tier, [load.job_id])
    rng = np.random.default_rng(2)
    assert primary.array[5].tobytes() == rng.integers(0, 256, BLOCK, dtype=np.uint8).tobytes()


def test_partial_load_names_the_blocks_that_loaded(primary, make_tier):
    tier = make_tier(primary)
    data = primary.fill(range(3), seed=4)
    tier.submit_store(s := job([key(i) for i in range(3)], range(3)))
    wait_jobs(tier, [s.job_id])
    tier._stores[0].remove(tier_key(tier, key(1)))  # evicted by someone else meanwhile
    primary.array[:] = 0
    tier.submit_load(ld := job([key(0), key(1), key(2)], [10, 11, 12]))
    res = wait_jobs(tier, [ld.job_id])[ld.job_id]
    assert not res.success
    assert set(res.successful_keys) == {key(0), key(2)}
    assert primary.array[10].tobytes() == data[0] and primary.array[12].tobytes() == data[2]
    assert tier.stats()["load_misses"] == 1


def tier_key(tier, k: bytes) -> str:
    from slabcache.integrations.vllm.keys import store_key

    return store_key(tier._ns, k)


def test_a_damaged_block_is_a_failed_load_never_wrong_bytes(primary, make_tier, tmp_path):
    tier = make_tier(primary)
    data = primary.fill(range(2), seed=5)
    tier.submit_store(s := job([key(0), key(1)], [0, 1]))
    wait_jobs(tier, [s.job_id])
    store = tier._stores[0]
    e = store.entry(tier_key(tier, key(1)))
    off = store.geometry.slot_offset(e.slot) + 100
    with open(os.path.join(store.path, "slab"), "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0xFF]))
    primary.array[:] = 7
    tier.submit_load(ld := job([key(0), key(1)], [4, 5]))
    res = wait_jobs(tier, [ld.job_id])[ld.job_id]
    assert not res.success and list(res.successful_keys) == [key(0)]
    assert primary.array[4].tobytes() == data[0]
    # vLLM recomputes key(1) into slot 5; what the tier left there is never
    # reported as loaded.


def test_keys_are_namespaced_by_model_and_dtype(primary, make_tier, tmp_path):
    a = make_tier(primary, spec=offloading_spec(model="org/a"))
    primary.fill([0], seed=6)
    a.submit_store(s := job([key(0)], [0]))
    wait_jobs(a, [s.job_id])
    assert a.lookup(key(0), None) is LookupResult.HIT
    b = make_tier(primary, spec=offloading_spec(model="org/b"))
    c = make_tier(primary, spec=offloading_spec(model="org/a", dtype="float16"))
    assert b.lookup(key(0), None) is LookupResult.MISS
    assert c.lookup(key(0), None) is LookupResult.MISS
    names = SlabStore.open(tmp_path / "store", readonly=True)
    try:
        (k,) = names.keys()
    finally:
        names.close()
    assert k.startswith(b"vllm/org_a_") and k.endswith(b"/" + key(0))


def test_a_new_engine_finds_what_the_last_one_stored(primary, make_tier, tmp_path):
    first = make_tier(primary)
    data = primary.fill(range(4), seed=7)
    first.submit_store(s := job([key(i) for i in range(4)], range(4)))
    wait_jobs(first, [s.job_id])
    first.shutdown()
    other = Primary()
    try:
        second = make_tier(other)
        assert [second.lookup(key(i), None) for i in range(4)] == [LookupResult.HIT] * 4
        second.submit_load(ld := job([key(i) for i in range(4)], range(4)))
        assert wait_jobs(second, [ld.job_id])[ld.job_id].success
        for i in range(4):
            assert other.array[i].tobytes() == data[i]
        second.shutdown()
    finally:
        other.close()


def test_eviction_at_capacity_keeps_the_tier_working(primary, make_tier):
    tier = make_tier(primary, capacity=str(8 * BLOCK))
    for rnd in range(4):
        primary.fill(range(8), seed=10 + rnd)
        tier.submit_store(s := job([key(100 * rnd + i) for i in range(8)], range(8)))
        assert wait_jobs(tier, [s.job_id])[s.job_id].success
    hits = [tier.lookup(key(300 + i), None) for i in range(8)]
    assert hits == [LookupResult.HIT] * 8
    assert tier.lookup(key(0), None) is LookupResult.MISS


def test_submit_returns_before_the_io_and_drain_waits_for_it(primary, make_tier):
    tier = make_tier(primary)
    gate = threading.Event()
    store = tier._stores[0]
    real = store.write

    def slow(*args):
        gate.wait(10)
        return real(*args)

    store.write = slow
    primary.fill([0], seed=8)
    t0 = time.perf_counter()
    tier.submit_store(s := job([key(0)], [0]))
    assert time.perf_counter() - t0 < 5  # did not wait for the gate
    assert tier.has_pending_work()
    assert list(tier.get_finished_jobs()) == []
    threading.Timer(0.2, gate.set).start()
    tier.drain_jobs()
    assert [r.job_id for r in tier.get_finished_jobs()] == [s.job_id]
    assert not tier.has_pending_work()


def test_loads_run_before_queued_stores(primary, make_tier):
    tier = make_tier(primary)
    primary.fill(range(2), seed=9)
    tier.submit_store(s := job([key(0)], [0]))
    wait_jobs(tier, [s.job_id])
    gate, order = threading.Event(), []
    store = tier._stores[0]
    put, read = store.write, store.read_into

    def slow_put(keys, *a):
        order.append("store")
        gate.wait(10)
        return put(keys, *a)

    def logged_read(*a):
        order.append("load")
        return read(*a)

    store.write, store.read_into = slow_put, logged_read
    # Every tier thread stuck in a store, more stores queued, then one load.
    jobs = [job([key(10 + i)], [1]) for i in range(4)]
    for j in jobs:
        tier.submit_store(j)
    time.sleep(0.2)
    tier.submit_load(ld := job([key(0)], [5]))
    gate.set()
    wait_jobs(tier, [j.job_id for j in jobs] + [ld.job_id])
    busy = tier._pool.threads
    assert order[:busy + 1] == ["store"] * busy + ["load"]


def test_shutdown_releases_every_view_of_the_primary_buffer(make_tier):
    p = Primary()
    tier = make_tier(p)
    p.fill(range(4), seed=11)
    tier.submit_store(job([key(i) for i in range(4)], range(4)))
    tier.submit_load(job([key(0)], [9]))
    tier.shutdown()  # finishes both jobs first
    p.close()  # BufferError if the tier still held a view
    tier.shutdown()  # idempotent


def _store_then_die(path: str, q) -> None:
    p = Primary()
    from slabcache.integrations.vllm import SlabCacheTier

    tier = SlabCacheTier(offloading_spec(), p.view, "SlabCacheTier", path=path,
                         capacity=str(64 * BLOCK))
    data = p.fill(range(6), seed=12)
    tier.submit_store(s := job([key(i) for i in range(6)], range(6)))
    assert wait_jobs(tier, [s.job_id])[s.job_id].success
    q.put([data[i] for i in range(6)])
    time.sleep(60)  # killed here, without shutdown(), as vLLM may kill its engine


def test_a_finished_store_survives_a_killed_engine(primary, make_tier, tmp_path):
    path = str(tmp_path / "store")
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_store_then_die, args=(path, q))
    proc.start()
    data = q.get(timeout=120)
    proc.kill()
    proc.join()
    tier = make_tier(primary, path=path, capacity=str(64 * BLOCK))
    tier.submit_load(ld := job([key(i) for i in range(6)], range(10, 16)))
    assert wait_jobs(tier, [ld.job_id])[ld.job_id].success
    for i in range(6):
        assert primary.array[10 + i].tobytes() == data[i]


def test_settings_errors_stop_start_up_naming_the_key(primary, make_tier, tmp_path):
    with pytest.raises(ConfigError, match="capacity"):
        make_tier(primary, capacity=None)
    with pytest.raises(ConfigError, match=r"unknown slabcache tier key\(s\) \['pathh'\]"):
        make_tier(primary, pathh="/x")
    with pytest.raises(ConfigError, match="slot_bytes"):
        make_tier(primary, slot_bytes=BLOCK // 2)


def test_a_store_made_for_other_blocks_is_a_start_up_error(primary, make_tier, tmp_path):
    path = tmp_path / "other"
    SlabStore.open(path, capacity_bytes=64 * (4 << 10), slot_bytes=4 << 10).close()
    with pytest.raises(ConfigError, match="smaller than one CPU-tier block"):
        make_tier(primary, path=str(path), capacity=str(64 * (4 << 10)))
    with pytest.raises(LayoutMismatchError, match=f"tier 'SlabCacheTier' at {path}.*slot_bytes"):
        make_tier(primary, path=str(path), slot_bytes=BLOCK, capacity=str(64 * (4 << 10)))
    with pytest.raises(LayoutMismatchError, match="'capacity'"):
        make_tier(primary, path=str(path), capacity=str(32 * (4 << 10)))


def test_an_existing_store_with_larger_slots_is_used_as_it_is(primary, make_tier, tmp_path):
    path = tmp_path / "big"
    SlabStore.open(path, capacity_bytes=16 * 2 * BLOCK, slot_bytes=2 * BLOCK).close()
    tier = make_tier(primary, path=str(path), capacity=str(16 * 2 * BLOCK))
    data = primary.fill([0], seed=14)
    tier.submit_store(s := job([key(0)], [0]))
    assert wait_jobs(tier, [s.job_id])[s.job_id].success
    tier.submit_load(ld := job([key(0)], [1]))
    assert wait_jobs(tier, [ld.job_id])[ld.job_id].success
    assert primary.array[1].tobytes() == data[0]


def test_several_paths_share_the_blocks(primary, make_tier, tmp_path):
    paths = [str(tmp_path / "a"), str(tmp_path / "b")]
    tier = make_tier(primary, path=",".join(paths), capacity=str(64 * BLOCK))
    data = primary.fill(range(32), seed=13)
    tier.submit_store(s := job([key(i) for i in range(32)], range(32)))
    assert wait_jobs(tier, [s.job_id])[s.job_id].success
    counts = [len(st.keys()) for st in tier._stores]
    assert sum(counts) == 32 and min(counts) > 0
    primary.array[:] = 0
    tier.submit_load(ld := job([key(i) for i in range(32)], range(32, 64)))
    assert wait_jobs(tier, [ld.job_id])[ld.job_id].success
    assert all(primary.array[32 + i].tobytes() == data[i] for i in range(32))


def test_a_request_is_looked_up_in_one_transaction_per_step(primary, make_tier):
    from vllm.v1.kv_offload.base import ReqContext

    tier = make_tier(primary)
    primary.fill(range(5), seed=15)
    tier.submit_store(s := job([key(i) for i in range(5)], range(5)))
    wait_jobs(tier, [s.job_id])
    store, calls = tier._stores[0], []
    real = store.contains
    store.contains = lambda keys: calls.append(len(keys)) or real(keys)
    ctx = ReqContext(req_id="r1")
    for i in range(10):  # vLLM's scheduler records the request's keys first
        ctx.set_offload_key_position(key(i), (i + 1) * 16)
    answers = [tier.lookup(key(i), ctx) for i in range(10)]
    assert answers == [LookupResult.HIT] * 5 + [LookupResult.MISS] * 5
    assert calls == [10]
    # Stored by someone else meanwhile: seen from the next scheduler step on.
    tier.submit_store(s := job([key(5)], [0]))
    wait_jobs(tier, [s.job_id])
    assert tier.lookup(key(5), ctx) is LookupResult.MISS
    tier.on_schedule_end(None)
    assert tier.lookup(key(5), ctx) is LookupResult.HIT
    assert calls == [10, 10]
    # Without the scheduler's key positions, one key at a time.
    assert tier.lookup(key(6), ReqContext(req_id="r2")) is LookupResult.MISS
    assert calls[-1] == 1
    assert tier.stats()["lookups"] == 13 and tier.stats()["lookup_hits"] == 6


def test_locality_is_reported_as_vllms_own_value(primary, make_tier):
    from vllm.v1.kv_offload.base import Locality

    assert make_tier(primary, locality="local").locality is Locality.LOCAL
    with pytest.raises(ConfigError, match="'locality'"):
        make_tier(primary, locality="far")


def _prometheus(tier_keys: dict):
    """vLLM's own OffloadPromMetrics for a connector config with this tier,
    on a private registry: what vLLM's /metrics endpoint would show."""
    import functools
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
    from vllm.distributed.kv_transfer.kv_connector.v1.offloading.metrics import OffloadPromMetrics

    reg = CollectorRegistry()
    extra = {"spec_name": "TieringOffloadingSpec", "cpu_bytes_to_use": 1 << 20,
             "secondary_tiers": [{"type": "SlabCacheTier", "module_path": "slabcache.integrations.vllm",
                                  **tier_keys}]}
    config = SimpleNamespace(kv_transfer_config=SimpleNamespace(kv_connector_extra_config=extra))
    kinds = {k: functools.partial(k, registry=reg) for k in (Counter, Gauge, Histogram)}
    return OffloadPromMetrics(config, kinds, ["engine"], {0: ["0"]}), reg


def test_the_tiers_counters_and_occupancy_reach_vllms_prometheus_metrics(primary, make_tier, tmp_path):
    prom, reg = _prometheus({"path": str(tmp_path / "store"), "capacity": "1G"})
    tier = make_tier(primary)
    primary.fill(range(4), seed=9)
    keys = [key(i) for i in range(4)]
    assert [tier.lookup(k, None) for k in keys[:2]] == [LookupResult.MISS] * 2
    tier.submit_store(st := job(keys, range(4)))
    wait_jobs(tier, [st.job_id])
    assert tier.lookup(keys[0], None) is LookupResult.HIT
    tier.submit_load(ld := job(keys[:3], range(10, 13)))
    wait_jobs(tier, [ld.job_id])
    prom.observe(tier.get_stats().data, engine_idx=0)

    def value(name, suffix="_total"):
        return reg.get_sample_value(f"vllm:slabcache_tier_{name}{suffix}", {"engine": "0", "tier": "SlabCacheTier"})

    assert (value("lookups"), value("lookup_hits"), value("stored_blocks"), value("loaded_blocks")) == (3, 1, 4, 3)
    assert value("write_bytes") == 4 * BLOCK and value("read_bytes") == 3 * BLOCK
    assert value("used_blocks", "") == 4 and value("capacity_blocks", "") == tier._stores[0].geometry.slot_count
    tier.submit_load(ld := job(keys[3:], [14]))
    wait_jobs(tier, [ld.job_id])
    prom.observe(tier.get_stats().data, engine_idx=0)  # what was gained since, not the totals again
    assert value("loaded_blocks") == 4 and value("stored_blocks") == 4


def test_kv_events_report_blocks_stored_and_evicted_in_order(primary, make_tier):
    spec = offloading_spec()
    spec.kv_events_config = SimpleNamespace(enable_kv_cache_events=True)
    tier = make_tier(primary, spec=spec, capacity=str(4 * BLOCK), enable_kv_events=True, locality="LOCAL")
    primary.fill(range(6), seed=10)
    keys = [key(i) for i in range(6)]
    tier.submit_store(a := job(keys[:4], range(4)))
    wait_jobs(tier, [a.job_id])
    tier.submit_store(b := job(keys[4:], range(4, 6)))
    wait_jobs(tier, [b.job_id])
    events = list(tier.take_events())
    assert [(e.removed, list(e.keys)) for e in events] == [
        (False, keys[:4]), (True, keys[:2]), (False, keys[4:])]
    assert all(e.medium is Medium.STORAGE and e.locality is Locality.LOCAL for e in events)
    assert list(tier.take_events()) == []
    assert tier.stats()["evicted_blocks"] == 2


def test_kv_events_stay_off_unless_vllm_publishes_them(primary, make_tier, caplog):
    tier = make_tier(primary, enable_kv_events=True)  # the spec has KV cache events off
    primary.fill([0], seed=11)
    tier.submit_store(a := job([key(0)], [0]))
    wait_jobs(tier, [a.job_id])
    assert list(tier.take_events()) == []
    assert "KV cache events are off" in caplog.text


def _hold_dispatchers(tier) -> threading.Event:
    """Keep every tier thread busy until the returned event is set, so the
    jobs submitted meanwhile queue up together."""
    gate, busy = threading.Event(), threading.Barrier(tier._pool.threads + 1)

    def hold():
        busy.wait(10)
        gate.wait(10)

    for _ in range(tier._pool.threads):
        tier._pool.submit(Priority.PREFETCH, hold)
    busy.wait(10)
    return gate


def _count_reads(store) -> list[int]:
    """The number of blocks in each read_into call on ``store``."""
    calls, real = [], store.read_into

    def counted(found, outs):
        calls.append(len(found))
        return real(found, outs)

    store.read_into = counted
    return calls


def test_load_jobs_queued_together_are_read_as_one_batch(primary, make_tier):
    tier = make_tier(primary)
    data = primary.fill(range(12), seed=11)
    tier.submit_store(s := job([key(i) for i in range(12)], range(12)))
    wait_jobs(tier, [s.job_id])
    tier._stores[0].remove(tier_key(tier, key(5)))  # gone since vLLM looked it up
    calls = _count_reads(tier._stores[0])
    primary.array[:] = 0
    gate = _hold_dispatchers(tier)
    loads = [job([key(i) for i in range(j, j + 4)], range(20 + j, 24 + j)) for j in (0, 4, 8)]
    for ld in loads:
        tier.submit_load(ld)
    gate.set()
    res = wait_jobs(tier, [ld.job_id for ld in loads])
    assert calls == [12]  # one lookup and one read for the three jobs
    first, second, third = (res[ld.job_id] for ld in loads)
    assert first.success and third.success and first.transfer_bytes == 4 * BLOCK
    # Each job answers for its own blocks: the miss fails only its job.
    assert not second.success and set(second.successful_keys) == {key(4), key(6), key(7)}
    for i in range(12):
        assert primary.array[20 + i].tobytes() == (bytes(BLOCK) if i == 5 else data[i])
    st = tier.stats()
    assert st["loaded_blocks"] == 11 and st["load_misses"] == 1


def test_merged_loads_stop_at_the_byte_cap_and_at_a_chunk_filled_twice(primary, make_tier, monkeypatch):
    from slabcache.integrations.vllm import tier as tier_mod

    monkeypatch.setattr(tier_mod, "MERGE_JOB_BYTES", 3 * BLOCK)
    tier = make_tier(primary)
    assert tier._pool.threads == 1  # small mmap blocks: batches run in queue order
    data = primary.fill(range(8), seed=12)
    tier.submit_store(s := job([key(i) for i in range(8)], range(8)))
    wait_jobs(tier, [s.job_id])
    calls = _count_reads(tier._stores[0])
    gate = _hold_dispatchers(tier)
    # 2 + 1 blocks fit the cap; the next 1 + 2 too, but its second job
    # fills chunk 30 again, so it waits for the batch after; as queued,
    # chunk 30 ends with the later job's block.
    loads = [job([key(0), key(1)], [20, 21]), job([key(2)], [22]), job([key(3)], [30]),
             job([key(4), key(5)], [30, 31]), job([key(6), key(7)], [23, 24])]
    for ld in loads:
        tier.submit_load(ld)
    gate.set()
    res = wait_jobs(tier, [ld.job_id for ld in loads])
    assert all(r.success for r in res.values())
    assert calls == [3, 1, 2, 2]
    got = {c: primary.array[c].tobytes() for c in (20, 21, 22, 23, 24, 30, 31)}
    assert got == {20: data[0], 21: data[1], 22: data[2], 23: data[6], 24: data[7], 30: data[4], 31: data[5]}


def test_a_merged_batch_that_fails_fails_each_of_its_jobs(primary, make_tier):
    tier = make_tier(primary)
    primary.fill(range(4), seed=13)
    tier.submit_store(s := job([key(i) for i in range(4)], range(4)))
    wait_jobs(tier, [s.job_id])

    def broken(found, outs):
        raise OSError(5, "injected: the disk went away")

    tier._stores[0].read_into = broken
    gate = _hold_dispatchers(tier)
    loads = [job([key(i)], [10 + i]) for i in range(4)]
    for ld in loads:
        tier.submit_load(ld)
    gate.set()
    res = wait_jobs(tier, [ld.job_id for ld in loads])
    assert sorted(res) == sorted(ld.job_id for ld in loads) and not any(r.success for r in res.values())
    assert tier.stats()["failed_jobs"] == 4 and not tier.has_pending_work()


def test_store_jobs_queued_together_are_written_as_one_batch(primary, make_tier):
    tier = make_tier(primary)
    data = primary.fill(range(6), seed=14)
    store = tier._stores[0]
    calls, real = [], store.write

    def write(keys, rows, descs):
        calls.append(len(keys))
        held = real(keys, rows, descs)
        # The block of key 4 is refused (every slot pinned, say).
        return [ok and k != tier_key(tier, key(4)) for k, ok in zip(keys, held)]

    store.write = write
    gate = _hold_dispatchers(tier)
    stores = [job([key(0), key(1)], [0, 1]), job([key(2), key(3)], [2, 3]), job([key(4), key(5)], [4, 5])]
    for st in stores:
        tier.submit_store(st)
    gate.set()
    res = wait_jobs(tier, [st.job_id for st in stores])
    assert calls == [6]
    assert [res[st.job_id].success for st in stores] == [True, True, False]
    primary.array[:] = 0
    tier.submit_load(ld := job([key(i) for i in (0, 1, 2, 3, 5)], [10, 11, 12, 13, 15]))
    assert wait_jobs(tier, [ld.job_id])[ld.job_id].success
    assert [primary.array[10 + i].tobytes() for i in (0, 1, 2, 3, 5)] == [data[i] for i in (0, 1, 2, 3, 5)]
