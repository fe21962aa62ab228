"""The ``slabcache`` command: a thin layer over the library.

Library errors become one clean line on stderr and an exit code here; no
store logic lives in this module.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from .errors import SlabcacheError

QUICK_SIZES = "64K,256K,4M"
FULL_SIZES = "16K,64K,256K,1M,4M,32M"


def _sizes(text: str) -> list[int]:
    from .bench import parse_size

    try:
        return [parse_size(s) for s in text.split(",") if s.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_bench(args) -> int:
    from . import bench

    sizes = args.sizes or _sizes(QUICK_SIZES if args.quick else FULL_SIZES)
    restart = [10_000] if args.quick else [100_000, 1_000_000]
    t0 = time.perf_counter()
    report = bench.run_suite(args.dir, sizes, args.quick, restart)
    report["seconds"] = time.perf_counter() - t0
    print(bench.markdown(report))
    if args.json:
        bench.write_json(report, args.json)
        print(f"\nJSON written to {args.json}")
    if args.plot:
        bench.plot(report, args.plot)
        print(f"chart written to {args.plot}")
    return 0


def _open_ro(path: str):
    from .store import SlabStore

    return SlabStore.open(path, readonly=True)


def cmd_stats(args) -> int:
    from .report import store_stats

    with _open_ro(args.path) as s:
        st = store_stats(s)
    if args.json:
        print(json.dumps(st, indent=1, default=str))
    else:
        for k, v in st.items():
            if isinstance(v, dict):
                print(f"{k}:")
                for kk, vv in v.items():
                    print(f"  {kk}: {vv}")
            else:
                print(f"{k}: {v}")
    return 0


def cmd_ls(args) -> int:
    from .report import list_entries

    with _open_ro(args.path) as s:
        rows = list_entries(s)
    if args.json:
        print(json.dumps(rows, indent=1, default=str))
    else:
        for r in rows:
            shapes = ";".join(f"{d}{list(sh)}" for d, sh in zip(r["dtypes"], r["shapes"]))
            pin = " pinned" if r["pinned"] else ""
            print(f"{r['key']!s}\t{r['bytes']}\t{shapes}\t{r['last_use']}{pin}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slabcache",
                                description="Slab store for LLM KV-cache chunks: benchmark and inspect stores.")
    p.add_argument("-v", "--verbose", action="store_true", help="log what the library does")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    b = sub.add_parser("bench", help="compare slabcache with a file-per-chunk store on one directory")
    b.add_argument("--quick", action="store_true", help="a short run (about a minute on 2 cores)")
    b.add_argument("--dir", default="slabcache-bench", help="scratch directory on the disk to test (default: ./slabcache-bench)")
    b.add_argument("--sizes", type=_sizes, help=f"chunk sizes, comma list (default {FULL_SIZES}; --quick {QUICK_SIZES})")
    b.add_argument("--json", metavar="FILE", help="also write the full results as JSON")
    b.add_argument("--plot", metavar="FILE", help="also draw a PNG chart (needs matplotlib)")
    b.set_defaults(func=cmd_bench)

    s = sub.add_parser("stats", help="geometry, occupancy, counters of a store (read-only)")
    s.add_argument("path")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_stats)

    ls = sub.add_parser("ls", help="one line per entry: key, bytes, dtypes/shapes, last use (read-only)")
    ls.add_argument("path")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_ls)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except SlabcacheError as exc:
        print(f"slabcache {args.command}: {exc}", file=sys.stderr)
        return 8
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"slabcache {args.command}: {exc}", file=sys.stderr)
        return 8
    except KeyboardInterrupt:
        print(f"slabcache {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
