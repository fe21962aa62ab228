"""Two nodes and LMCache's own cache server: each node's slab answers
before the shared remote tier, as LMCache's own disk tier does.

Two LMCache engines in separate processes stand for two nodes, each with
its own slabcache path; ``python -m lmcache.v1.server`` is the tier they
share (``remote_url: lm://host:port``).  Needs lmcache==0.5.6.
"""

import os
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("lmcache", reason="lmcache==0.5.6 is not installed: run ./tools/bootstrap.sh --with-lmcache")

pytestmark = pytest.mark.lmcache

NODE = r"""
import os, sys, time, torch
sys.path.insert(0, os.getcwd())
from tests.integrations import lmcache_harness as h
path, port, phase = sys.argv[1:4]
cfg = h.config(path)
cfg.remote_url = f"lm://127.0.0.1:{port}"
cfg.remote_serde = "naive"
eng = h.engine(cfg)
print("order", ",".join(eng.storage_manager.storage_backends), flush=True)
tokens, kv = h.prompt(3 * h.CHUNK + 5, seed=11)
slab = h.backend(eng).store

def retrieve(tag):
    hits = slab.stats()["hits"]
    n = eng.lookup(tokens)
    for _ in range(100):  # another node's stores reach the server in the background
        if n == len(tokens) or phase != "other":
            break
        time.sleep(0.1)
        n = eng.lookup(tokens)
    out = torch.zeros_like(kv)
    got = int(eng.retrieve(tokens, kv=out).sum())
    print(tag, n, got, torch.equal(out, kv), slab.stats()["hits"] - hits, flush=True)

if phase == "store":
    eng.store(tokens, kv=kv)
    h.wait_stored(eng, 4)
    retrieve("own")
    sys.stdin.readline()  # the server is stopped meanwhile
    retrieve("server-gone")
else:
    retrieve(phase)
h.destroy(cfg)
os._exit(0)
"""
TOKENS, CHUNKS = 3 * 16 + 5, 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, proc, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"LMCache's server exited: {proc.stderr.read()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"LMCache's server did not listen on {port} in {timeout}s")


def _env():
    return dict(os.environ, PYTHONHASHSEED="0", LMCACHE_TRACK_USAGE="false")


def _node(path, port, phase):
    return subprocess.run([sys.executable, "-c", NODE, path, str(port), phase], capture_output=True,
                          text=True, env=_env(), cwd=os.getcwd(), timeout=240)


def _line(out: str, tag: str) -> list[str]:
    lines = [ln.split() for ln in out.splitlines() if ln.startswith(tag + " ")]
    assert lines, f"no {tag!r} line in:\n{out[-3000:]}"
    return lines[-1][1:]


def test_each_nodes_slab_answers_before_the_shared_server_and_without_it(tmp_path):
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "lmcache.v1.server", "127.0.0.1", str(port), "cpu"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
    a = None
    try:
        _wait_listening(port, server)
        a = subprocess.Popen([sys.executable, "-c", NODE, str(tmp_path / "a"), str(port), "store"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=_env(), cwd=os.getcwd())
        order = a.stdout.readline().split()
        own = a.stdout.readline().split()
        assert order == ["order", "LocalCPUBackend,LocalDiskBackend,RemoteBackend"], order
        # Node A's own prompt comes from its slab: every chunk a slab hit.
        assert own == ["own", str(TOKENS), str(TOKENS), "True", str(CHUNKS)], (own, a.stderr.read()[-3000:]
                                                                                if a.poll() is not None else "")

        b = _node(str(tmp_path / "b"), port, "other")  # an empty slab: the server has A's chunks
        assert b.returncode == 0, b.stderr[-3000:]
        assert _line(b.stdout, "other") == [str(TOKENS), str(TOKENS), "True", "0"]

        server.kill()
        server.wait(30)
        out, err = a.communicate("go\n", timeout=120)
        assert a.returncode == 0, err[-3000:]
        assert _line(out, "server-gone") == [str(TOKENS), str(TOKENS), "True", str(CHUNKS)]
        assert "Traceback" not in err and "LMCache ERROR" not in err, err[-3000:]

        again = _node(str(tmp_path / "a"), port, "restart")  # restarted, the server still gone
        assert again.returncode == 0, again.stderr[-3000:]
        assert _line(again.stdout, "restart") == [str(TOKENS), str(TOKENS), "True", str(CHUNKS)]
        assert "Traceback" not in again.stderr and "LMCache ERROR" not in again.stderr, again.stderr[-3000:]
    finally:
        for p in (a, server):
            if p is None:
                continue
            if p.poll() is None:
                p.kill()
                p.wait(30)
            for stream in (p.stdin, p.stdout, p.stderr):
                if stream is not None:
                    stream.close()
