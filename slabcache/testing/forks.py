"""Fork trials: a parent keeps a store busy while forked children use it.

What vLLM, gunicorn and ``multiprocessing`` do: fork workers while the
parent has a handle open (with puts queued on its worker threads).  Each
child must find the inherited handle refused with StoreForkedError, and a
fresh ``SlabStore.open`` in the child must work independently of the
parent, which closes and reopens its own handle meanwhile.  Run this in a
process of its own (it forks the caller).
"""

from __future__ import annotations

import json
import os
import signal
import time
import traceback
from dataclasses import asdict, dataclass, field

from ..admin.fsck import check
from ..core import SlabStore
from ..errors import StoreForkedError
from .values import expected


@dataclass
class ForkReport:
    rounds: int = 0
    children: int = 0
    child_ops: int = 0
    parent_ops: int = 0
    inherited_refused: int = 0
    inherited_used: int = 0  # the inherited handle worked: it must not
    wrong: int = 0
    errors: list = field(default_factory=list)
    hung: int = 0
    died: int = 0
    fsck_exit: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _check(store: SlabStore, key: str) -> tuple[int, int]:
    """(ops, wrong) for one get of ``key``: a miss is fine, other bytes not."""
    v = store.get(key)
    if v is None:
        return 1, 0
    e = expected(key)
    return 1, int(not (v.shape == e.shape and bool((v == e).all())))


def _child(path: str, inherited: SlabStore, out_dir: str, seed: int) -> None:
    res = {"ops": 0, "wrong": 0, "refused": 0, "used": 0, "errors": []}
    try:
        for _ in range(3):
            try:
                inherited.get("p0")
                res["used"] += 1
            except StoreForkedError:
                res["refused"] += 1
        inherited.close()  # a no-op here; must not disturb the parent
        with SlabStore.open(path) as s:
            for i in range(120):
                k = f"c{seed}-{i % 30}"
                s.put(k, expected(k))
                for key in (k, f"p{i % 40}"):
                    ops, wrong = _check(s, key)
                    res["ops"] += ops
                    res["wrong"] += wrong
    except BaseException:
        res["errors"].append(traceback.format_exc(limit=4))
    with open(os.path.join(out_dir, f"child-{os.getpid()}.json"), "w") as f:
        json.dump(res, f)


def fork_trials(path: str, out_dir: str, rounds: int = 3, children: int = 4,
                timeout: float = 60.0) -> ForkReport:
    rep = ForkReport()
    os.makedirs(out_dir, exist_ok=True)
    s = SlabStore.open(path, capacity_bytes=256 * 4096, slot_bytes=4096)
    for i in range(40):
        s.put(f"p{i}", expected(f"p{i}"))
    for r in range(rounds):
        rep.rounds += 1
        # The parent's workers are busy with queued puts when it forks.
        futs = [s.jobs.put(f"a{r}-{i}", expected(f"a{r}-{i}")) for i in range(48)]
        pids = []
        for c in range(children):
            pid = os.fork()
            if pid == 0:
                try:
                    _child(path, s, out_dir, r * children + c)
                finally:
                    os._exit(0)
            pids.append(pid)
        rep.children += len(pids)
        for f in futs:
            f.result()
        s.close()
        s = SlabStore.open(path)
        for i in range(80):
            k = f"p{i % 40}"
            if i % 3 == 0:
                s.put(k, expected(k))
            ops, wrong = _check(s, k)
            rep.parent_ops += ops
            rep.wrong += wrong
        deadline = time.monotonic() + timeout
        for pid in pids:
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    rep.died += int(not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0)
                    break
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    rep.hung += 1
                    break
                time.sleep(0.01)
    s.close()
    for name in os.listdir(out_dir):
        with open(os.path.join(out_dir, name)) as f:
            res = json.load(f)
        rep.child_ops += res["ops"]
        rep.wrong += res["wrong"]
        rep.inherited_refused += res["refused"]
        rep.inherited_used += res["used"]
        rep.errors += res["errors"]
    rep.fsck_exit = check(path, progress=False).exit_code
    return rep
