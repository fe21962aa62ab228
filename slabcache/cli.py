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
    from .format.sizes import parse_size

    try:
        return [parse_size(s) for s in text.split(",") if s.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_bench(args) -> int:
    from .bench import suite as bench

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
    from .core import SlabStore

    return SlabStore.open(path, readonly=True)


def cmd_stats(args) -> int:
    from .admin.reports import store_stats

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
    from .admin.reports import list_entries

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


def cmd_fsck(args) -> int:
    from .admin.fsck import check

    res = check(args.path, repair=args.repair, deep=args.deep, rebuild_index=args.rebuild_index,
                progress=not args.json)
    if args.json:
        print(json.dumps(res.to_dict(), indent=1))
        return res.exit_code
    for f in res.findings:
        where = " ".join(x for x in (f"slot {f.slot}" if f.slot is not None else "",
                                     f"key {f.key}" if f.key else "") if x)
        state = "FIXED" if f.fixed else ("left" if res.repaired else "found")
        print(f"{state:5} {f.kind}: {f.detail}{' (' + where + ')' if where else ''}")
    scrub = f", scrubbed {res.bytes_scrubbed} bytes at {res.to_dict()['scrub_gbps']:.2f} GB/s" \
        if args.deep else ""
    verdict = {0: "clean", 1: "errors corrected", 4: "errors left uncorrected"}[res.exit_code]
    print(f"{res.path}: {res.entries} entries in {res.slots_total} slots{scrub}: {verdict}")
    if res.exit_code == 4 and not res.repaired:
        print("run again with --repair to fix (or --rebuild-index if the index is lost)")
    return res.exit_code


def cmd_compact(args) -> int:
    from .admin.compact import compact

    res = compact(args.path, capacity_bytes=args.capacity, slot_bytes=args.slot_bytes,
                  progress=not args.json)
    if args.json:
        print(json.dumps(res.to_dict(), indent=1))
        return 0
    b, a = res.before, res.after
    print(f"{res.path}: {b['slots_total']} x {b['slot_bytes']} B -> {a['slots_total']} x "
          f"{a['slot_bytes']} B; kept {res.kept} of {b['slots_used']} entries, "
          f"dropped {len(res.dropped)} ({res.seconds:.1f} s)")
    for d in res.dropped[:20]:
        print(f"  dropped {d['key']} ({d['bytes']} B): {d['why']}")
    if len(res.dropped) > 20:
        print(f"  ... and {len(res.dropped) - 20} more (--json lists them all)")
    return 0


def _size(text: str) -> int:
    from .format.sizes import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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

    f = sub.add_parser("fsck", help="check a store; --repair fixes it (exit 0 clean, 1 fixed, 4 left, 8 error)")
    f.add_argument("path")
    f.add_argument("--repair", action="store_true", help="fix what is found (needs the store closed everywhere)")
    f.add_argument("--deep", action="store_true", help="also verify every payload's checksum")
    f.add_argument("--rebuild-index", action="store_true", help="rebuild the index from the slot records")
    f.add_argument("--json", action="store_true", help="print findings and summary as JSON")
    f.set_defaults(func=cmd_fsck)

    c = sub.add_parser("compact", help="shrink, grow or re-slot a store (needs it closed everywhere)")
    c.add_argument("path")
    c.add_argument("--capacity", type=_size, metavar="SIZE", help="new capacity: 20G, 512MiB, bytes")
    c.add_argument("--slot-bytes", type=_size, metavar="N", help="new slot size")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_compact)

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
    except Exception as exc:  # never a traceback, never exit 1 ("all corrected" for fsck)
        logging.getLogger("slabcache").info("%s failed", args.command, exc_info=True)
        print(f"slabcache {args.command}: {type(exc).__name__}: {exc} (the store may be damaged: "
              f"run `slabcache fsck {getattr(args, 'path', '') or 'PATH'}`; -v shows where it "
              "failed)", file=sys.stderr)
        return 8


if __name__ == "__main__":
    sys.exit(main())
