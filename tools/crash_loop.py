#!/usr/bin/env python3
"""Kill a writer (puts, removes, pins) with SIGKILL at random moments, N times.

After each kill: fsck --repair must fix everything it finds, the store must
reopen, every key the writer acknowledged must be served bit-identical or
be a miss, removed keys must stay removed, and no slot may leak.

    python tools/crash_loop.py [--kills 50] [--durability fast|strict] [--io mmap|direct] [--dir DIR]
                               [--slot-bytes N]  (512 KiB or more: a block per slot record)
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from slabcache.admin.progress import Progress  # noqa: E402
from slabcache.testing import crash_loop  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=50)
    ap.add_argument("--durability", choices=["fast", "strict"], default="fast")
    ap.add_argument("--io", choices=["mmap", "direct"], default="mmap")
    ap.add_argument("--dir", help="scratch directory (default: a temporary one)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--slot-bytes", type=int, default=4096)
    args = ap.parse_args()
    work = args.dir or tempfile.mkdtemp(prefix="slabcache-crash-")
    path = os.path.join(work, "store")
    shutil.rmtree(path, ignore_errors=True)

    bar = Progress(args.kills, "kills ")
    rep = crash_loop(path, kills=args.kills, durability=args.durability, io=args.io,
                     seed=args.seed, progress=lambda _i, _n: bar.step(), slot_bytes=args.slot_bytes)
    print(json.dumps(rep.to_dict(), indent=1))
    if not args.dir:
        shutil.rmtree(work, ignore_errors=True)
    ok = rep.wrong == 0 and rep.fsck_unfixable == 0 and rep.leaks == 0 and rep.resurrected == 0
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
