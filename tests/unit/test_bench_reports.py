"""The host benchmarks' reports of several runs (``--from-json RUN1 RUN2``):
every round of every run pooled, each round's contenders still paired.
The README's LMCache and vLLM tables are made this way."""

import errno
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _vllm_run(theirs: list[float], ours: list[float]) -> dict:
    """A vllm_tier.py report: fs and slabcache-mmap at 1 MiB blocks."""
    def contender(vals):
        runs = {w: list(vals) for w in ("store", "warm_load", "cold_load", "churn")} | {
            "lookup_1000_ms": [1.0] * len(vals), "churn_loads": [1] * len(vals),
            "churn_stores": [1] * len(vals)}
        return {w: sorted(v)[len(v) // 2] for w, v in runs.items()} | {"runs": runs}

    return {"rounds": len(theirs), "job_blocks": 8,
            "results": {"1M": {"fs": contender(theirs), "slabcache-mmap": contender(ours)}}}


def _lmcache_run(theirs: list[float], ours: list[float]) -> dict:
    """A lmcache_engine.py report: LocalDiskBackend and the plugin at 8 MiB chunks."""
    def rounds(vals):
        return [{w: v for w in ("store", "warm retrieve", "cold retrieve", "churn")}
                | {"store_blocks_ms": 1.0, "warm retrieve backend_ms": 1.0} for v in vals]

    return {"rounds": len(theirs), "results": [
        {"chunk": 8 << 20, "contender": contender, "prompts": 8,
         "median": rounds([sorted(vals)[len(vals) // 2]])[0], "runs": rounds(vals)}
        for contender, vals in (("lmcache-buffered", theirs), ("slabcache-mmap", ours))]}


SCRIPTS = {
    "vllm_tier.py": (_vllm_run, "| 1M | mmap vs fs", None),
    "lmcache_engine.py": (_lmcache_run, "| 8 MiB | slabcache-mmap vs lmcache-buffered", "lmcache"),
}


def _ratio_cell(script: str, row: str, *files: Path) -> tuple[str, str]:
    """(the report's first line, the store cell of ``row``)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, f"benchmarks/{script}", "--from-json", *map(str, files)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    line = next(line for line in out.stdout.splitlines() if line.startswith(row))
    return out.stdout.splitlines()[0], [c.strip() for c in line.strip().strip("|").split("|")][2]


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_a_report_of_several_runs_pools_their_rounds_in_pairs(tmp_path, script):
    make, row, needs = SCRIPTS[script]
    if needs:
        pytest.importorskip(needs, reason=f"benchmarks/{script} needs {needs} "
                            "(./tools/bootstrap.sh --with-lmcache)")
    # Round by round, slabcache / its baseline: 2, 4 in the first run, 3, 8 in the second.
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(make(theirs=[1, 1], ours=[2, 4])))
    b.write_text(json.dumps(make(theirs=[2, 1], ours=[6, 8])))
    heading, cell = _ratio_cell(script, row, a, b)
    assert heading.startswith("4 rounds in 2 run(s)")
    # Medians over all four rounds: 5 / 1; the range over the rounds' own ratios.
    assert cell.startswith("**5.00x** (2.00-8.00)")
    assert _ratio_cell(script, row, a)[1].startswith("**3.00x** (2.00-4.00)")


def _bench(name: str):
    """The module ``benchmarks/<name>.py`` (the scripts import each other by
    their bare names, as they do when run)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_each_round_reads_back_in_one_shuffled_order_for_every_contender():
    read_order = _bench("report").read_order
    written = [f"prompt-{i}" for i in range(48)]
    first = read_order(written, 0)
    assert sorted(first) == sorted(written)  # each request read once
    assert first != written  # not the order written: readahead gets no help
    assert read_order(written, 0) == first  # every contender of the round alike
    assert read_order(written, 1) != first  # a new order each round
    assert written == [f"prompt-{i}" for i in range(48)]  # the caller's list untouched


def test_the_lmcache_report_puts_each_tier_beside_the_device(tmp_path):
    """With fio's rounds in the report: each store as a share of fio's
    writes, and each retrieve's time inside the tier as a share of fio's
    time to read a prompt (warm ones only for the O_DIRECT pair), round by
    round against the fio run of the same round: median (range)."""
    pytest.importorskip("lmcache", reason="benchmarks/lmcache_engine.py needs lmcache "
                        "(./tools/bootstrap.sh --with-lmcache)")

    def row(contender, rounds):
        median = {k: sorted(r[k] for r in rounds)[len(rounds) // 2] for k in rounds[0]}
        return {"chunk": 8 << 20, "contender": contender, "prompts": 8, "median": median,
                "runs": rounds}

    def tier(*rounds):
        return [{"store": store, "warm retrieve": 1.0, "cold retrieve": 1.0, "churn": 1.0,
                 "store_blocks_ms": 1.0, "warm retrieve backend_ms": warm_ms,
                 "cold retrieve backend_ms": cold_ms} for store, warm_ms, cold_ms in rounds]

    # Two rounds.  fio: 10 then 20 prompts/s written, 20 then 10 read (50
    # then 100 ms to read a prompt).
    report = {"rounds": 2, "results": [
        row("slabcache-mmap", tier((5.0, 1.0, 100.0), (20.0, 1.0, 100.0))),
        row("lmcache-buffered", tier((20.0, 1.0, 50.0), (20.0, 1.0, 50.0))),
        row("slabcache-direct", tier((10.0, 25.0, 40.0), (10.0, 50.0, 200.0))),
        row("lmcache-odirect", tier((8.0, 200.0, 100.0), (8.0, 100.0, 100.0))),
        row("fio", [{"store": 10.0, "read": 20.0}, {"store": 20.0, "read": 10.0}])]}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(report))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "benchmarks/lmcache_engine.py", "--from-json", str(path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if ln.strip().startswith("8 MiB writes"))
    # Medians of two rounds are their means; each share is paired with its own round's fio.
    assert line.strip() == (
        "8 MiB writes 15.0, reads 15.0; "
        "store slabcache-mmap 75% (50%-100%), lmcache-buffered 150% (100%-200%), "
        "slabcache-direct 75% (50%-100%), lmcache-odirect 60% (40%-80%); "
        "cold retrieve (tier) slabcache-mmap 75% (50%-100%), lmcache-buffered 150% (100%-200%), "
        "slabcache-direct 88% (50%-125%), lmcache-odirect 75% (50%-100%); "
        "warm retrieve (tier) slabcache-direct 200% (200%), lmcache-odirect 62% (25%-100%)")
    # A run without fio's rounds reports no device.
    del report["results"][-1]
    path.write_text(json.dumps(report))
    out = subprocess.run([sys.executable, "benchmarks/lmcache_engine.py", "--from-json", str(path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "the device" not in out.stdout


def test_the_vllm_report_puts_stores_and_cold_loads_beside_the_device():
    """Each tier's stores and cold loads as a share of fio's writes and
    reads, paired round by round with that round's fio run; runs from
    before the device's writes were timed report loads only."""
    vllm_tier = _bench("vllm_tier")

    def runs(store, cold):
        return {"store": sorted(store)[1], "cold_load": sorted(cold)[1],
                "runs": {"store": store, "cold_load": cold}}

    # Three rounds; fio writes 10, 20, 40 blocks/s and reads 100, 100, 25.
    # fs's shares by round: stores 100%, 50%, 100%; cold loads 100%, 50%,
    # 200% (the ratio of its medians would be 50% each).
    r = {"fs": runs([10, 10, 40], [100, 50, 50]),
         "slabcache-direct": runs([10, 10, 10], [50, 100, 25]),
         "memory": runs([1000] * 3, [1000] * 3),
         vllm_tier.DEVICE: runs([10, 20, 40], [100, 100, 25])}
    line = vllm_tier.device_shares("1M", r)
    assert line == ("1M: the device (fio, reads in order, queue depth 32) 100 blocks/s; cold loads "
                    "fs 100%, slabcache-direct 100% of it; writes (in order into a new file, queue "
                    "depth 16) 20 blocks/s; stores fs 100%, slabcache-direct 50% of it")
    for name in r:
        del r[name]["runs"]["store"], r[name]["store"]
    assert vllm_tier.device_shares("1M", r).endswith("cold loads fs 100%, slabcache-direct 100% of it")


def test_the_vllm_device_writes_a_new_file_each_round(tmp_path, monkeypatch):
    """The device's writes go to blocks the disk has not seen, as every
    tier's store does (a new slab, new files): the file is gone when fio
    writes it."""
    vllm_tier = _bench("vllm_tier")
    device = tmp_path / "device-1M"
    calls = []

    def fio_gbps(fio, *args):
        calls.append((args, device.exists()))
        if "--rw=write" in args:
            device.write_bytes(b"x")
        return 1.0

    monkeypatch.setattr(vllm_tier, "fio_gbps", fio_gbps)
    for _ in range(2):
        assert vllm_tier.time_device("fio", str(device), 1 << 20, 32) == {"store": 1e9 / (1 << 20),
                                                                          "cold_load": 1e9 / (1 << 20)}
    writes = [(args, existed) for args, existed in calls if "--rw=write" in args]
    assert len(writes) == 2 and not any(existed for _args, existed in writes)
    assert all("--iodepth=16" in args and f"--filename={device}" in args for args, _e in writes)
    reads = [args for args, _e in calls if "--rw=read" in args]
    assert len(reads) == 2 and all("--readonly" in args for args in reads)


def test_the_unverified_contenders_are_the_plugin_without_checksums(tmp_path):
    """``--unverified`` adds the plugin opened with slabcache.checksum false,
    each in its pair's mode; the plain contenders verify."""
    pytest.importorskip("lmcache", reason="benchmarks/lmcache_engine.py needs lmcache "
                        "(./tools/bootstrap.sh --with-lmcache)")
    lmcache_engine = _bench("lmcache_engine")
    seen = {}
    for name in ("slabcache-mmap", "slabcache-mmap-unverified", "slabcache-direct-unverified"):
        path = tmp_path / name
        path.mkdir()
        e = lmcache_engine.Engine(name, str(path), 256 << 10, capacity_prompts=2)
        try:
            store = e.backend.store
            seen[name] = (store.engine.name, store.checksum)
        finally:
            e.close()
    assert seen == {"slabcache-mmap": ("mmap", True), "slabcache-mmap-unverified": ("mmap", False),
                    "slabcache-direct-unverified": ("direct", False)}


def test_the_disk_reuse_report_pairs_each_rewrite_with_its_rounds_fresh_write():
    """Each kind over fresh is taken round by round, so a slow round of the
    disk slows both of its writes alike (a ratio of medians would not)."""
    summarize = _bench("disk_reuse").summarize
    rounds = [{"fresh": 1.0, "rewrite": 3.0, "zero-range": 1.0},
              {"fresh": 2.0, "rewrite": 2.0, "zero-range": 4.0},
              {"fresh": 3.0, "rewrite": 3.0, "zero-range": 3.0}]
    s = summarize(rounds)
    assert (s["fresh"], s["rewrite"], s["zero-range"]) == (2.0, 3.0, 3.0)
    assert s["rewrite/fresh"] == 1.0 and s["rewrite/fresh range"] == "1.00-3.00"
    assert s["zero-range/fresh"] == 1.0 and s["zero-range/fresh range"] == "1.00-2.00"


def test_zero_range_keeps_the_file_and_reads_back_zeros(tmp_path):
    """The zero-range kind rewrites blocks the disk has seen: the file keeps
    its size (and blocks) and reads back as zeros."""
    zero_range = _bench("disk_reuse").zero_range
    path = tmp_path / "f"
    path.write_bytes(b"\xab" * (1 << 20))
    try:
        zero_range(str(path), 1 << 20)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
            pytest.skip(f"the filesystem under {tmp_path} has no FALLOC_FL_ZERO_RANGE ({exc}); "
                        "disk_reuse.py's zero-range writes need ext4 or XFS (set TMPDIR to one)")
        raise
    data = path.read_bytes()
    assert len(data) == 1 << 20 and data == bytes(1 << 20)


def test_the_direct_records_comparison_opens_what_it_names(tmp_path, monkeypatch):
    """Each contender's store writes its records the way it is named, and
    the summary pairs the two round by round."""
    direct_records = _bench("direct_records")
    monkeypatch.setattr(direct_records, "VALUE", 1 << 20)
    for contender, direct in (("o_direct", True), ("buffered", False)):
        s = direct_records.open_store(str(tmp_path / contender), contender, 8)
        try:
            assert s._records.direct is direct
        finally:
            s.close()
    rounds = {"o_direct": [{"m": 3.0}, {"m": 2.0}, {"m": 2.0}],
              "buffered": [{"m": 1.0}, {"m": 2.0}, {"m": 4.0}]}
    s = direct_records.summarize(rounds)["m"]
    assert (s["o_direct"], s["buffered"]) == (2.0, 2.0)
    assert s["ratio"] == 1.0 and s["range"] == "0.50-3.00" and s["faster"] == 1


def test_the_writeback_report_splits_a_fill_into_burst_last_half_and_sync():
    writeback = _bench("writeback")
    batch = writeback.VALUE * writeback.BATCH
    first = writeback.BURST // batch
    # Eight batches: the burst's take 1 s each, the rest 2 s; the sync 4 s.
    times = [1.0] * first + [2.0] * (8 - first) + [4.0]
    r = writeback.rates(times, 8 * batch)
    assert r["burst"] == first * batch / first / 1e9
    assert r["last half"] == 4 * batch / 8.0 / 1e9
    assert r["until on disk"] == 8 * batch / (sum(times)) / 1e9


@pytest.mark.parametrize("contender", ["slab-mmap", "files", "slab-direct"])
def test_each_writeback_contender_writes_what_it_names(tmp_path, monkeypatch, contender):
    """Every value lands where the contender says (a store of that engine,
    or a file each), and the fill's last figure is its sync."""
    from slabcache import SlabStore

    writeback = _bench("writeback")
    monkeypatch.setattr(writeback, "VALUE", 1 << 20)
    values = [torch.full((1 << 20,), i, dtype=torch.uint8) for i in range(writeback.BATCH)]
    engines = []

    class Opener:
        @staticmethod
        def open(*args, **kwargs):
            s = SlabStore.open(*args, **kwargs)
            engines.append(s.engine.name)
            return s

    monkeypatch.setattr(writeback, "SlabStore", Opener)
    root = tmp_path / "fill"
    times = writeback.fill(str(root), contender, values, 3 * writeback.BATCH << 20)
    assert engines == ([] if contender == "files" else [contender.split("-")[1]])
    assert len(times) == 3 + 1 and all(t >= 0 for t in times)
    if contender == "files":
        names = sorted(os.listdir(root))
        assert names == sorted(f"{b}-{i}.chunk" for b in range(3) for i in range(writeback.BATCH))
        assert (root / "2-3.chunk").read_bytes() == bytes([3]) * (1 << 20)
    else:
        with SlabStore.open(root / "store") as s:
            assert len(s.keys()) == 3 * writeback.BATCH
            assert torch.equal(s.get("2-3"), values[3])
