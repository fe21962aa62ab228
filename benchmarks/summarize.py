"""Summarise a `slabcache bench --json` file as the README's ratio tables:
each contender against its matched baseline in the same run (slabcache-mmap
and LMCache buffered against buffered file-per-chunk, LMCache's default;
slabcache-direct and LMCache with use_odirect against O_DIRECT file-per-chunk).

    python benchmarks/summarize.py benchmarks/results/quick.json
"""

import json
import sys

from slabcache.bench.contenders import BASELINE_OF


def main(path: str) -> None:
    rep = json.load(open(path))
    rows = rep["results"]
    by = {(r["contender"], r["size"], r["workload"]): r for r in rows}
    contenders = [c for c in BASELINE_OF if any(r["contender"] == c for r in rows)]
    sizes = sorted({r["size"] for r in rows if r["workload"] == "churn"})

    def ratio(c, size, w):
        r, b = by.get((c, size, w)), by.get((BASELINE_OF[c], size, w))
        return f"{r['ops_per_s'] / b['ops_per_s']:.2f}x" if r and b and b["ops_per_s"] else "-"

    def fmt(n):
        return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"

    header = " | ".join(f"{c} vs {BASELINE_OF[c].removeprefix('file-per-chunk-')}" for c in contenders)
    for w in ("churn", "fill", "cold get", "warm get"):
        print(f"\n{w} (ops/s against the matched file-per-chunk baseline in the same run):\n")
        print("| chunk | " + header + " |")
        print("|---|" + "---:|" * len(contenders))
        for s in sizes:
            print(f"| {fmt(s)} | " + " | ".join(ratio(c, s, w) for c in contenders) + " |")
    look = [r for r in rows if r["workload"] == "lookup 1000" and r["contender"].startswith("slabcache")]
    rs = [r for r in rows if r["workload"].startswith("restart,")]
    if look:
        print(f"\n`batched_contains` of 1,000 keys, p50: {min(r['p50_us'] for r in look) / 1e3:.2f}-"
              f"{max(r['p50_us'] for r in look) / 1e3:.2f} ms over all sizes and engines.")
    for r in rs:
        print(f"Restart to first hit, {r['workload'].split(',')[1].strip()}: "
              f"{r['p50_us'] / 1e3:.1f} ms ({r['hits']} hit).")
    print(f"\nRun time {rep.get('seconds', 0):.0f} s; memcpy {rep['references']['memcpy_gbps']:.1f} GB/s.")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/quick.json")
