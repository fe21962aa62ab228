"""Worker pool priorities, async puts, batched reads, close semantics, O_DIRECT."""

import os
import threading
import time

import pytest
import torch

from slabcache import ConfigError, QueueFullError, SlabStore, StoreClosedError
from slabcache.device import EngineWrapper
from slabcache.runtime.workers import Priority, WorkerPool

from tests.helpers import rand_tensor, resident_pages, run_py


def test_priority_order_and_fifo_within_priority():
    pool = WorkerPool(threads=1)
    gate = threading.Event()
    order = []
    running = threading.Event()

    def block():
        running.set()
        gate.wait()

    pool.submit(Priority.PUT, block)  # occupies the only thread...
    assert running.wait(10)  # ...once it runs: a later start would take higher priorities first
    futs = [pool.submit(Priority.PUT, order.append, f"put{i}") for i in range(3)]
    futs.append(pool.submit(Priority.DELETE, order.append, "delete"))
    futs += [pool.submit(Priority.PREFETCH, order.append, f"prefetch{i}") for i in range(2)]
    gate.set()
    for f in futs:
        f.result(10)
    pool.shutdown()
    assert order == ["prefetch0", "prefetch1", "delete", "put0", "put1", "put2"]


def test_priority_is_an_intenum():
    assert Priority.PREFETCH < Priority.DELETE < Priority.PUT


def test_bad_pool_settings(tmp_path):
    for kw, frag in [(dict(io_threads=0), "io_threads"), (dict(max_pending_puts=-1), "max_pending_puts"),
                     (dict(queue_full="drop"), "use one of reject, wait")]:
        with pytest.raises(ConfigError, match=frag):
            SlabStore.open(tmp_path / "s", capacity_bytes=8192, slot_bytes=4096, **kw)


class _Gate(EngineWrapper):
    """Once armed, blocks the engine's next write until released (open a
    store with ``engine_wrapper=_Gate``; ``store.engine`` is then the gate)."""

    def __init__(self, inner):
        super().__init__(inner)
        self.started = threading.Event()
        self.release = threading.Event()
        self._armed = False

    def arm(self) -> "_Gate":
        """Block the next write (and only that one)."""
        self._armed = True
        return self

    def write(self, slot, parts, hashed=False):
        if self._armed:
            self._armed = False
            self.started.set()
            assert self.release.wait(30)
        return self.inner.write(slot, parts, hashed)


def test_prefetch_overtakes_queued_puts(make_store):
    s = make_store(capacity_bytes=64 * 4096, io_threads=1, engine_wrapper=_Gate)
    s.put("hot", rand_tensor(4000, 1))
    gate = s.engine.arm()
    done = []
    lock = threading.Lock()

    def record(name):
        def cb(_f):
            with lock:
                done.append(name)
        return cb

    puts = []
    for i in range(20):
        f = s.jobs.put(f"p{i}", rand_tensor(4000, 100 + i))
        f.add_done_callback(record(f"p{i}"))
        puts.append(f)
    assert gate.started.wait(10)
    pf = s.jobs.prefetch(["hot", "missing"])
    pf.add_done_callback(record("prefetch"))
    gate.release.set()
    vals = pf.result(30)
    assert all(f.result(30) for f in puts)
    assert torch.equal(vals[0], rand_tensor(4000, 1)) and vals[1] is None
    # p0 was already being written; every other put was queued behind the prefetch.
    assert done == ["p0", "prefetch"] + [f"p{i}" for i in range(1, 20)]


def test_put_async_roundtrip_and_visibility(make_store):
    s = make_store(capacity_bytes=64 * 4096)
    futs = [s.jobs.put(f"k{i}", rand_tensor(4096, i)) for i in range(32)]
    assert all(f.result(30) is True for f in futs)
    vals = s.get_many([f"k{i}" for i in range(32)] + ["nope"])
    assert vals[-1] is None
    assert all(torch.equal(v, rand_tensor(4096, i)) for i, v in enumerate(vals[:-1]))


def test_entry_not_visible_before_written(make_store):
    s = make_store(io_threads=1, engine_wrapper=_Gate)
    gate = s.engine.arm()
    f = s.jobs.put("k", rand_tensor(100, 1))
    assert gate.started.wait(10)
    assert "k" not in s and s.get("k") is None  # being written: not visible yet
    gate.release.set()
    assert f.result(10) and torch.equal(s.get("k"), rand_tensor(100, 1))


def test_bounded_queue_rejects(make_store):
    s = make_store(io_threads=1, max_pending_puts=3, engine_wrapper=_Gate)
    gate = s.engine.arm()
    futs = [s.jobs.put(f"k{i}", rand_tensor(10, i)) for i in range(3)]
    with pytest.raises(QueueFullError, match="max_pending_puts=3"):
        s.jobs.put("k3", rand_tensor(10, 3))
    assert s.stats()["queue_rejections"] == 1
    gate.release.set()
    assert all(f.result(10) for f in futs)
    assert s.jobs.put("k3", rand_tensor(10, 3)).result(10)


def test_bounded_queue_waits(make_store):
    s = make_store(io_threads=1, max_pending_puts=2, queue_full="wait", engine_wrapper=_Gate)
    gate = s.engine.arm()
    futs = [s.jobs.put(f"k{i}", rand_tensor(10, i)) for i in range(2)]
    third = []
    t = threading.Thread(target=lambda: third.append(s.jobs.put("k2", rand_tensor(10, 2))))
    t.start()
    t.join(0.3)
    assert t.is_alive()  # waiting for room
    gate.release.set()
    t.join(10)
    assert third and third[0].result(10) and all(f.result(10) for f in futs)


def test_close_finishes_queued_puts(tmp_path, engine):
    p = tmp_path / "s"
    s = SlabStore.open(p, capacity_bytes=64 * 4096, slot_bytes=4096, io=engine, io_threads=2)
    futs = [s.jobs.put(f"k{i}", rand_tensor(4000, i)) for i in range(40)]
    s.close()
    assert all(f.done() and f.result() for f in futs)
    with SlabStore.open(p, io=engine) as s:
        assert len(s) == 40


def test_close_waits_for_an_operation_in_flight_and_refuses_new_ones(tmp_path, engine):
    """close() on one thread while a put runs on another: close waits for
    it, calls begun once the store is closed raise, and the put lands."""
    p = tmp_path / "s"
    s = SlabStore.open(p, capacity_bytes=64 * 4096, slot_bytes=4096, io=engine, engine_wrapper=_Gate)
    value = rand_tensor(4000, 7)
    gate = s.engine.arm()
    stored = []
    putter = threading.Thread(target=lambda: stored.append(s.put("inflight", value)))
    putter.start()
    assert gate.started.wait(10)  # the put is inside the engine's write
    closer = threading.Thread(target=s.close)
    closer.start()
    deadline = time.monotonic() + 10
    while not s.closed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert s.closed
    with pytest.raises(StoreClosedError):
        s.get("inflight")
    closer.join(0.3)
    assert closer.is_alive()  # still waiting for the put
    gate.release.set()
    putter.join(10)
    closer.join(10)
    assert not closer.is_alive() and stored == [True]
    with SlabStore.open(p, io=engine) as s:
        assert torch.equal(s.get("inflight"), value)


def test_close_can_cancel_queued_puts(make_store):
    s = make_store(capacity_bytes=64 * 4096, io_threads=1, engine_wrapper=_Gate)
    gate = s.engine.arm()
    futs = [s.jobs.put(f"k{i}", rand_tensor(100, i)) for i in range(10)]
    assert gate.started.wait(10)
    closer = threading.Thread(target=s.close, kwargs={"cancel_pending": True})
    closer.start()
    deadline = time.monotonic() + 10
    while not all(f.cancelled() for f in futs[1:]) and time.monotonic() < deadline:
        time.sleep(0.01)  # close() cancels the queue before it waits for p0
    gate.release.set()
    closer.join(10)
    assert futs[0].result() is True  # already being written: finished
    assert all(f.cancelled() for f in futs[1:])
    with pytest.raises(StoreClosedError):
        s.jobs.put("x", rand_tensor(1, 1))
    with pytest.raises(StoreClosedError):
        s.get_many(["k0"])


def test_get_many_into_cpu(make_store):
    s = make_store(capacity_bytes=16 * 4096)
    for i in range(8):
        s.put(f"k{i}", rand_tensor(4096, i).view(torch.float32).reshape(32, 32))
    outs = [torch.empty(32, 32) for _ in range(9)]
    ok = s.get_many_into([f"k{i}" for i in range(8)] + ["nope"], outs)
    assert ok == [True] * 8 + [False]
    for i in range(8):
        assert torch.equal(outs[i].view(torch.uint8).reshape(-1), rand_tensor(4096, i))
    with pytest.raises(ValueError, match="one out per key"):
        s.get_many_into(["k0"], [])


def test_direct_puts_leave_no_page_cache(tmp_path):
    p = tmp_path / "s"
    with SlabStore.open(p, capacity_bytes=64 * 65536, slot_bytes=65536, io="direct") as s:
        fd = os.open(p / "slab", os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        for i in range(32):
            s.put(f"k{i}", rand_tensor(65536 - 100 * i, i))  # aligned and unaligned lengths
        for i in range(32):
            assert torch.equal(s.get(f"k{i}"), rand_tensor(65536 - 100 * i, i))
        g = s.geometry
        resident = resident_pages(str(p / "slab"), g.data_offset, g.capacity_bytes)
    assert resident == 0
    # The mmap engine, by contrast, leaves what it reads cached: the check can fail.
    with SlabStore.open(p, io="mmap") as s:
        for i in range(32):
            s.get(f"k{i}")
        assert resident_pages(str(p / "slab"), g.data_offset, g.capacity_bytes) > 0


def test_remove_async(make_store):
    s = make_store()
    s.put("k", rand_tensor(10, 1))
    assert s.jobs.remove("k").result(10) is True
    assert "k" not in s and s.stats()["slots_free"] == s.stats()["slots_total"]
    assert s.jobs.remove("k").result(10) is False


def test_cpu_tensors_never_touch_torch_cuda():
    # Every torch.cuda entry point the transfer path uses raises; a whole
    # CPU workflow (sync, async, batched, into) must not reach any of them,
    # nor import the CUDA transfer module.
    out = run_py("""
        import sys, tempfile, torch
        def refuse(*a, **k):
            raise AssertionError("torch.cuda was touched")
        for name in ("is_available", "current_stream", "Stream", "stream", "synchronize",
                     "current_device", "init", "device_count"):
            setattr(torch.cuda, name, refuse)
        from slabcache import SlabStore
        with tempfile.TemporaryDirectory() as d, \\
                SlabStore.open(d + "/s", capacity_bytes=8 << 20, slot_bytes=1 << 20) as s:
            v = torch.arange(1000, dtype=torch.float32)
            assert s.put("a", v) and torch.equal(s.get("a"), v)
            assert s.jobs.put("b", [v, v[:10]]).result()
            assert s.get_many(["a", "b", "c"])[2] is None
            outs = [torch.empty(1000), [torch.empty(1000), torch.empty(10)]]
            assert s.get_many_into(["a", "b"], outs) == [True, True]
            assert s.jobs.prefetch(["a"]).result()[0] is not None
            assert s.jobs.remove("a").result()
        print("transfer imported:", "slabcache.runtime.transfer" in sys.modules)
    """)
    assert out.stdout.strip().endswith("transfer imported: False"), out.stdout + out.stderr


def test_staged_bytes_fill_non_contiguous_outs_at_any_offset():
    # CUDA gets read a list value into one staging buffer: the second part
    # starts at byte 6, which no float32 view may start at.
    from slabcache.runtime.transfer import fill_from_bytes

    a = torch.arange(3, dtype=torch.bfloat16)
    b = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    staged = torch.cat([a.view(torch.uint8), b.reshape(-1).view(torch.uint8)])
    out_a = torch.empty(3, dtype=torch.bfloat16)
    out_b = torch.empty(4, 3, dtype=torch.float32).t()  # non-contiguous
    fill_from_bytes(out_a, staged[:6])
    fill_from_bytes(out_b, staged[6:])
    assert torch.equal(out_a, a) and torch.equal(out_b, b)


def test_failed_pinned_allocation_gives_its_slot_back(monkeypatch):
    from slabcache.runtime import transfer

    def no_pinned(*a, **k):
        raise RuntimeError("out of pinned memory")

    monkeypatch.setattr(transfer.torch, "empty", no_pinned)
    pool = transfer.StagingPool(count=1)
    for _ in range(3):  # with the slot leaked, the second call would block forever
        done = threading.Event()
        errors = []

        def try_acquire():
            try:
                pool.acquire(4096)
            except RuntimeError as exc:
                errors.append(exc)
            done.set()

        threading.Thread(target=try_acquire, daemon=True).start()
        assert done.wait(10), "acquire blocked: a failed allocation kept its slot"
        assert "pinned" in str(errors[0])


def test_close_racing_put_async_leaves_no_threads_and_no_late_failures(tmp_path, engine):
    for attempt in range(5):
        s = SlabStore.open(tmp_path / f"s{attempt}", capacity_bytes=64 * 4096, slot_bytes=4096, io=engine,
                           queue_full="wait")
        accepted, refused = [], []
        deadline = time.monotonic() + 30

        def submitter():
            i = 0
            while time.monotonic() < deadline:  # until close refuses one
                try:
                    accepted.append(s.jobs.put(f"k{i % 40}", rand_tensor(100, i)))
                except StoreClosedError:
                    refused.append(i)
                    return
                i += 1

        t = threading.Thread(target=submitter)
        t.start()
        time.sleep(0.05)
        s.close()
        t.join(30)
        # Every put accepted before close finished; none fails later; the
        # first one after close was refused at once, with StoreClosedError.
        assert accepted and all(f.done() and f.result() is True for f in accepted)
        assert refused == [len(accepted)]
        assert not [th for th in threading.enumerate() if th.name.startswith("slabcache-io")]
