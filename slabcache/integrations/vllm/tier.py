"""SlabCacheTier: a slabcache store as a secondary tier of vLLM's OffloadingConnector.

vLLM calls every method here on its scheduler thread, so none of them may
wait for the disk: ``submit_store`` / ``submit_load`` / ``touch`` queue a
task on the tier's own threads (loads first, then touches, then stores: a
request waits on a load, nobody waits on a store) and return.  Each task is
one batch call on the store for the jobs of its kind queued by then (up to
MERGE_JOB_BYTES): ``write`` (one reserve and one commit transaction for
their blocks) or ``lookup`` + ``read_into`` (one lookup, one validation),
copying straight between the slab and the CPU tier's shared buffer; each
job is then answered for its own blocks.  ``lookup`` is a single LMDB read
(microseconds).

A store job is reported finished only after its entries are committed, so
a block vLLM counts as stored survives a killed engine (vLLM may kill the
engine core at exit without calling ``shutdown``).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Collection, Iterable
from typing import ClassVar

import numpy as np
import torch
from vllm.v1.kv_offload.base import (
    Locality,
    LookupResult,
    Medium,
    OffloadingCounterMetadata,
    OffloadingEvent,
    OffloadingGaugeMetadata,
    OffloadKey,
    ReqContext,
    RequestOffloadingContext,
)
from vllm.v1.kv_offload.tiering.base import JobResult, SecondaryTierManager, TransferJob

from ...core.store import SlabStore
from ...core.values import describe
from ...errors import SlabcacheError
from ...runtime.workers import Priority, WorkerPool
from ..stores import open_host_store
from .keys import namespace, store_key
from .settings import tier_config

log = logging.getLogger(__name__)

# The tier's own threads only dispatch batches (the store's threads do the
# parallel I/O of a large batch).  With the page cache (``mmap``), jobs of
# small blocks are mostly Python holding the GIL: a second dispatcher only
# contends (warm 64 KiB loads: 42.9k blocks/s with one, 24.6k with two).
# Jobs of large blocks, and every job of the ``direct`` engine, mostly wait
# on the disk: two let one job's read be in flight while the other's
# Python runs (64 KiB direct loads: 11.8k -> 19.8k blocks/s; 1 MiB blocks
# loaded 1.2-1.6x as fast with two).  Four were slower than two.
SMALL_BLOCK = 256 << 10


def tier_threads(block_size_bytes: int, engine: str) -> int:
    return 1 if block_size_bytes < SMALL_BLOCK and engine == "mmap" else 2


# Jobs of one kind queued together are moved as one batch of up to this many
# bytes: a job of a few blocks alone keeps few requests in flight and pays
# its transactions for little.  A/B with all jobs submitted at
# once (loads / fs, medians of 4 rounds): 64 KiB blocks, four 8-block jobs
# a batch, direct warm 0.82 -> 1.26x and cold 0.81 -> 1.15x, mmap warm
# 1.83 -> 2.64x; 1 MiB blocks, two jobs a batch, mmap cold 0.85 -> 1.02x,
# direct cold 0.96 -> 1.07x (32 MiB, four jobs, was slower: 0.76x, 0.89x);
# stores of 1 MiB blocks: direct 0.86 -> 0.94x, mmap 2.13 -> 2.24x.
# A job this size or more runs alone (8 MiB blocks: merging was mixed), so
# a large job's latency never waits on another's.
MERGE_JOB_BYTES = 16 << 20


# What vLLM's Prometheus endpoint shows of the tier, labelled by tier type.
METRIC = "vllm:slabcache_tier_{}"
COUNTERS = {
    "lookups": "Blocks vLLM looked up in the slabcache tier.",
    "lookup_hits": "Blocks the slabcache tier held when looked up.",
    "stored_blocks": "Blocks stored (or found stored) by store jobs.",
    "store_refused": "Blocks a store job could not store: every slot pinned.",
    "loaded_blocks": "Blocks loaded into the CPU tier.",
    "load_misses": "Blocks a load job found gone (evicted or damaged since the lookup); vLLM recomputes them.",
    "evicted_blocks": "Blocks the tier evicted to make room.",
    "failed_jobs": "Store or load jobs that failed outright.",
    "read_bytes": "Bytes loaded into the CPU tier.",
    "write_bytes": "Bytes stored.",
}
GAUGES = {
    "used_blocks": "Blocks held by the slabcache tier's stores (every process sharing them).",
    "capacity_blocks": "Blocks the slabcache tier's stores can hold.",
}


def _events_on(offloading_spec) -> bool:
    """Whether vLLM publishes KV events at all (a tier's events are only
    drained when it does)."""
    cfg = getattr(offloading_spec, "kv_events_config", None)
    if cfg is None:
        return bool(getattr(offloading_spec.config, "enable_kv_cache_events", False))
    return bool(cfg.enable_kv_cache_events)


# vLLM bounds what is in flight (stores pin CPU-tier blocks until finished,
# and its back-pressure detector drops stores); the tier does not drop any.
UNBOUNDED = 1 << 40


class _Verdicts:
    """A request's lookup answers for one scheduler step."""

    __slots__ = ("step", "answers")

    def __init__(self, step: int):
        self.step = step
        self.answers: dict[bytes, bool] = {}


class SlabCacheTier(SecondaryTierManager):
    """Blocks of vLLM's CPU tier stored in slabcache stores (one per path)."""

    medium: ClassVar[Medium] = Medium.STORAGE

    def __init__(self, offloading_spec, primary_kv_view: memoryview, tier_type: str,
                 backpressure_detector=None, **tier_keys):
        super().__init__(offloading_spec, primary_kv_view, tier_type, backpressure_detector)
        parallel = offloading_spec.config.parallel
        self.settings = tier_config(tier_keys, block_size_bytes=self.block_size_bytes,
                                    data_parallel_index=getattr(parallel, "data_parallel_index", 0))
        self.locality = Locality(self.settings.locality) if self.settings.locality else None
        self._ns = namespace(offloading_spec)
        # One description for every block: raw bytes of one CPU-tier block.
        self._desc = describe([(self.block_size_bytes,)], [torch.uint8], is_list=False, extra=b"vllm")
        self._stores: list[SlabStore] = []
        try:
            for path in self.settings.paths:
                self._stores.append(self._open(path))
        except BaseException:
            for s in self._stores:
                s.close()
            raise
        # Zero-copy rows of the CPU tier's buffer; released in shutdown()
        # (vLLM cannot unmap its region while a view of it is exported).
        self._rows = torch.from_numpy(np.asarray(primary_kv_view).view(np.uint8))
        dispatchers = tier_threads(self.block_size_bytes, self._stores[0].engine.name)
        self._pool = WorkerPool(dispatchers, max_pending_puts=UNBOUNDED, on_full="wait",
                                name="slabcache-vllm")
        self._finished: collections.deque[JobResult] = collections.deque()
        # Jobs queued and not yet taken by a tier thread, by kind (under _cv).
        self._jobs: dict[Priority, collections.deque] = {Priority.PREFETCH: collections.deque(),
                                                         Priority.PUT: collections.deque()}
        self._cv = threading.Condition()
        self._in_flight = 0
        self._shut = False
        self._counts: collections.Counter = collections.Counter()  # from the tier threads
        self._lookups = self._lookup_hits = 0  # the scheduler thread only
        self._step = 0
        self._counts_lock = threading.Lock()
        self._reported: dict[str, int] = {}  # counters as get_stats last reported them
        # The keys each store evicts, counted and (with events) reported.
        self._evictions = [s.watch_evictions() for s in self._stores]
        self._events: collections.deque[OffloadingEvent] | None = None
        if self.settings.kv_events:
            if _events_on(offloading_spec):
                self._events = collections.deque()
            else:
                log.warning("slabcache tier %s: enable_kv_events is set but vLLM's KV cache events are off; "
                            "the tier publishes none", tier_type)
        log.info("slabcache tier %s: %d path(s) %s, %d slots of %d bytes each, namespace %r",
                 tier_type, len(self._stores), list(self.settings.paths),
                 sum(s.geometry.slot_count for s in self._stores), self.block_size_bytes, self._ns)

    def _open(self, path: str) -> SlabStore:
        return open_host_store(
            self.settings.options_for(path, self.settings.options.slot_bytes), unit=self.block_size_bytes,
            unit_name="one CPU-tier block", who=f"slabcache tier {self.tier_type!r}",
            keys="The tier keys 'capacity' (split over the paths) and 'slot_bytes'")

    # ---------------------------------------------------------------- keys

    def _shard(self, key: OffloadKey) -> int:
        # Block hashes are sha256 output: their first bytes spread evenly.
        return int.from_bytes(key[:4], "big") % len(self._stores)

    def _by_store(self, keys: list[OffloadKey]) -> dict[int, list[int]]:
        if len(self._stores) == 1:
            return {0: list(range(len(keys)))}
        groups: dict[int, list[int]] = {}
        for i, k in enumerate(keys):
            groups.setdefault(self._shard(k), []).append(i)
        return groups

    # ---------------------------------------------------------------- scheduler-side API

    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        # vLLM asks chunk by chunk, stopping at the first miss.  The first
        # question for a request this step answers every key the request has
        # so far in one read transaction per store (under 1 us a key, against
        # several for a transaction each), and the rest come from that.
        verdicts = req_context.get_state(_Verdicts) if req_context is not None else None
        if verdicts is None or verdicts.step != self._step:
            verdicts = _Verdicts(self._step)
            if req_context is not None:
                req_context.set_state(verdicts)
        hit = verdicts.answers.get(key)
        if hit is None:
            # vLLM records every key of the request, in prefix order, before
            # it looks any up (a private field: without it, one key at a time).
            known = getattr(req_context, "_offload_key_positions", None) or ()
            batch = [key] + [k for k in known if k != key and k not in verdicts.answers]
            verdicts.answers.update(zip(batch, self._contains(batch)))
            hit = verdicts.answers[key]
        self._lookups += 1
        self._lookup_hits += hit
        return LookupResult.HIT if hit else LookupResult.MISS

    def _contains(self, keys: list[OffloadKey]) -> list[bool]:
        out = [False] * len(keys)
        for si, idx in self._by_store(keys).items():
            try:
                got = self._stores[si].contains([store_key(self._ns, keys[i]) for i in idx])
            except SlabcacheError as exc:
                log.warning("slabcache tier: lookup failed, answering miss: %s", exc)
                continue
            for i, g in zip(idx, got):
                out[i] = g
        return out

    def on_schedule_end(self, context) -> None:
        self._step += 1  # answers cached for a request last only within a step

    def submit_store(self, job_metadata: TransferJob) -> None:
        self._queue(Priority.PUT, job_metadata)

    def submit_load(self, job_metadata: TransferJob) -> None:
        self._queue(Priority.PREFETCH, job_metadata)

    def touch(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        keys = list(keys)
        if keys and not self._shut:
            self._pool.submit(Priority.DELETE, self._touch, keys)

    def get_finished_jobs(self) -> Iterable[JobResult]:
        out = []
        while self._finished:
            out.append(self._finished.popleft())
        return out

    def has_pending_work(self) -> bool:
        return self._in_flight > 0 or bool(self._finished)

    def on_new_request(self, req_context: ReqContext) -> RequestOffloadingContext:
        return RequestOffloadingContext()

    def drain_jobs(self) -> None:
        with self._cv:
            while self._in_flight:
                self._cv.wait()

    def shutdown(self) -> None:
        """Finish queued jobs, close the stores, release every view of vLLM's buffer."""
        if self._shut:
            return
        self._shut = True
        self._pool.shutdown()
        for s in self._stores:
            s.close()
        self._rows = None

    def stats(self) -> dict:
        """The tier's counters (``COUNTERS``: lookups, lookup_hits,
        stored_blocks, store_refused, loaded_blocks, load_misses,
        evicted_blocks, failed_jobs, read_bytes, write_bytes)."""
        with self._counts_lock:
            counts = {"lookups": self._lookups, "lookup_hits": self._lookup_hits, **self._counts}
        return {name: counts.get(name, 0) for name in COUNTERS}

    @classmethod
    def build_metric_definitions(cls, extra_config: dict) -> dict:
        """The Prometheus metrics the tier reports (vLLM registers them)."""
        out = {METRIC.format(n): OffloadingCounterMetadata(documentation=d, labelnames=("tier",))
               for n, d in COUNTERS.items()}
        out.update({METRIC.format(n): OffloadingGaugeMetadata(documentation=d, labelnames=("tier",))
                    for n, d in GAUGES.items()})
        return out

    def get_stats(self):
        """What the counters gained since the last call, and the stores'
        occupancy now (vLLM calls this from its scheduler each step it logs)."""
        from vllm.distributed.kv_transfer.kv_connector.v1.offloading.metrics import OffloadingConnectorStats

        if self._shut:
            return None
        out, label = OffloadingConnectorStats(), (self.tier_type,)
        now = self.stats()
        for name, value in now.items():
            gained = value - self._reported.get(name, 0)
            if gained:
                out.increase_counter(METRIC.format(name), gained, label)
        self._reported = now
        try:
            used = sum(len(s) for s in self._stores)
        except SlabcacheError as exc:
            log.debug("slabcache tier: occupancy not read: %s", exc)
        else:
            out.set_gauge(METRIC.format("used_blocks"), used, label)
        out.set_gauge(METRIC.format("capacity_blocks"), sum(s.geometry.slot_count for s in self._stores), label)
        return out

    def take_events(self) -> Iterable[OffloadingEvent]:
        """KV events for blocks stored and evicted since the last call, in
        the order they happened (with ``enable_kv_events``)."""
        out = []
        if self._events is not None:
            while self._events:
                out.append(self._events.popleft())
        return out

    def _count(self, **deltas: int) -> None:
        with self._counts_lock:
            self._counts.update(deltas)

    # ---------------------------------------------------------------- jobs (tier threads)

    @staticmethod
    def _job_of(job: TransferJob) -> tuple[int, list, list[int]]:
        keys = list(job.keys)
        chunk_ids = [int(c) for c in job.chunk_ids]
        if len(keys) != len(chunk_ids):
            raise ValueError(f"job {job.job_id} has {len(keys)} keys but {len(chunk_ids)} chunk ids")
        return job.job_id, keys, chunk_ids

    def _queue(self, priority: Priority, job_metadata: TransferJob) -> None:
        job = self._job_of(job_metadata)
        queue = self._jobs[priority]
        with self._cv:
            self._in_flight += 1
            queue.append(job)
        try:
            # One drain task a job: whichever runs first takes every job of
            # its kind queued by then (_take); the others find fewer or none.
            self._pool.submit(priority, self._drain, priority)
        except BaseException:
            with self._cv:
                mine = job in queue
                if mine:
                    queue.remove(job)
            if mine:
                self._done(JobResult(job_id=job[0], success=False))
            raise

    def _take(self, priority: Priority) -> list[tuple[int, list, list[int]]]:
        """The queued jobs one batch moves: the first, and those after it
        while the batch stays within MERGE_JOB_BYTES and touches no CPU-tier
        chunk twice (a load never fills one buffer twice; such jobs run one
        after the other, as queued)."""
        queue = self._jobs[priority]
        with self._cv:
            taken, size, chunks = [], 0, set()
            while queue:
                job_chunks = queue[0][2]
                n = len(job_chunks) * self.block_size_bytes
                if taken and (size + n > MERGE_JOB_BYTES or not chunks.isdisjoint(job_chunks)):
                    break
                taken.append(queue.popleft())
                size += n
                chunks.update(job_chunks)
            return taken

    def _drain(self, priority: Priority) -> None:
        jobs = self._take(priority)
        if not jobs:
            return
        load = priority == Priority.PREFETCH
        t0 = time.perf_counter()
        keys = [k for _, ks, _ in jobs for k in ks]
        chunk_ids = [c for _, _, cs in jobs for c in cs]
        try:
            moved = (self._load_blocks if load else self._store_blocks)(keys, chunk_ids)
        except Exception as exc:  # reported as failed jobs, never lost
            # The text only: a record holding the exception would hold its
            # frames, and with them views of vLLM's buffer.
            log.warning("slabcache tier: %d %s job(s) of %d blocks failed: %s", len(jobs),
                        "load" if load else "store", len(keys), str(exc))
            self._count(failed_jobs=len(jobs))
            moved = None
        spent = time.perf_counter() - t0
        at = 0
        for job_id, ks, _ in jobs:
            if moved is None:
                result = JobResult(job_id=job_id, success=False)
            elif load:
                result = self._load_result(job_id, ks, moved[at:at + len(ks)])
            else:
                result = JobResult(job_id=job_id, success=all(moved[at:at + len(ks)]),
                                   transfer_bytes=len(ks) * self.block_size_bytes)
            at += len(ks)
            result.transfer_time = spent
            self._done(result)

    def _done(self, result: JobResult) -> None:
        self._finished.append(result)
        with self._cv:
            self._in_flight -= 1
            self._cv.notify_all()

    def _store_blocks(self, keys: list, chunk_ids: list[int]) -> list[bool]:
        """Store each block from its CPU-tier chunk; whether each is held."""
        rows, desc = self._rows, self._desc
        held = [False] * len(keys)
        for si, idx in self._by_store(keys).items():
            try:
                stored = self._stores[si].write(
                    [store_key(self._ns, keys[i]) for i in idx], [rows[chunk_ids[i]] for i in idx],
                    [desc] * len(idx))
            finally:
                self._note_evictions(si)
            n = sum(stored)
            self._count(stored_blocks=n, store_refused=len(idx) - n, write_bytes=n * self.block_size_bytes)
            if self._events is not None and n:
                self._events.append(OffloadingEvent(keys=[keys[i] for i, ok_ in zip(idx, stored) if ok_],
                                                    medium=self.medium, removed=False, locality=self.locality))
            for i, ok in zip(idx, stored):
                held[i] = ok
        return held

    def _load_blocks(self, keys: list, chunk_ids: list[int]) -> list[bool]:
        """Read each block into its CPU-tier chunk; whether each loaded."""
        rows, bs = self._rows, self.block_size_bytes
        loaded = [False] * len(keys)
        for si, idx in self._by_store(keys).items():
            store = self._stores[si]
            found = store.lookup([store_key(self._ns, keys[i]) for i in idx])
            # A block of another size under this key (a store shared with a
            # differently sized engine) is a miss, not a partial copy.
            found = [f if f is not None and f.length == bs else None for f in found]
            got = store.read_into(found, [rows[chunk_ids[i]] for i in idx])
            for i, d in zip(idx, got):
                loaded[i] = d is not None
        return loaded

    def _load_result(self, job_id: int, keys: list, loaded: list[bool]) -> JobResult:
        bs = self.block_size_bytes
        n = sum(loaded)
        self._count(loaded_blocks=n, load_misses=len(keys) - n, read_bytes=n * bs)
        if n == len(keys):
            return JobResult(job_id=job_id, success=True, transfer_bytes=n * bs)
        # vLLM keeps the blocks that did load and recomputes the rest.
        return JobResult(job_id=job_id, success=False, transfer_bytes=n * bs,
                         successful_keys=tuple(k for k, ok in zip(keys, loaded) if ok) or None)

    def _note_evictions(self, si: int) -> None:
        """Count what a store's last write evicted; with events on, report
        the tier's own blocks among them as removed (before the blocks that
        write stored: they took the evicted ones' slots)."""
        gone = self._evictions[si].take()
        if not gone:
            return
        self._count(evicted_blocks=len(gone))
        if self._events is not None:
            ns, cut = self._ns, len(self._ns)
            mine = [k[cut:] for k in gone if isinstance(k, bytes) and k.startswith(ns)]
            if mine:
                self._events.append(OffloadingEvent(keys=mine, medium=self.medium, removed=True,
                                                    locality=self.locality))

    def _touch(self, keys: list) -> None:
        for si, idx in self._by_store(keys).items():
            try:
                self._stores[si].touch([store_key(self._ns, keys[i]) for i in idx])
            except SlabcacheError as exc:  # a use not counted is harmless
                log.debug("slabcache tier: touch skipped: %s", exc)
