"""Summarise a `slabcache bench --json` file as the README's ratio table.

    python benchmarks/summarize.py benchmarks/results/full.json
"""

import json
import sys


def main(path: str) -> None:
    rep = json.load(open(path))
    rows = rep["results"]
    base = {(r["size"], r["workload"]): r for r in rows if r["contender"] == "file-per-chunk"}
    contenders = [c for c in ("slabcache-mmap", "slabcache-direct", "lmcache-LocalDiskBackend")
                  if any(r["contender"] == c for r in rows)]
    sizes = sorted({r["size"] for r in rows if r["workload"] == "churn"})

    def ratio(c, size, w):
        r = next((x for x in rows if x["contender"] == c and x["size"] == size and x["workload"] == w), None)
        b = base.get((size, w))
        return f"{r['ops_per_s'] / b['ops_per_s']:.2f}x" if r and b and b["ops_per_s"] else "-"

    def fmt(n):
        return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"

    for w in ("churn", "fill", "cold get", "warm get"):
        print(f"\n{w} (ops/s against file-per-chunk in the same run):\n")
        print("| chunk | " + " | ".join(contenders) + " |")
        print("|---|" + "---:|" * len(contenders))
        for s in sizes:
            print(f"| {fmt(s)} | " + " | ".join(ratio(c, s, w) for c in contenders) + " |")
    look = [r for r in rows if r["workload"] == "lookup 1000" and r["contender"].startswith("slabcache")]
    rs = [r for r in rows if r["workload"].startswith("restart,")]
    print(f"\n`batched_contains` of 1,000 keys, p50: {min(r['p50_us'] for r in look) / 1e3:.2f}-"
          f"{max(r['p50_us'] for r in look) / 1e3:.2f} ms over all sizes and engines.")
    for r in rs:
        print(f"Restart to first hit, {r['workload'].split(',')[1].strip()}: "
              f"{r['p50_us'] / 1e3:.1f} ms ({r['hits']} hit).")
    print(f"\nRun time {rep.get('seconds', 0):.0f} s; memcpy {rep['references']['memcpy_gbps']:.1f} GB/s.")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/full.json")
