"""Transactions in flight, counted so that a pause can wait for none.

A fork must not find a transaction in flight (the child closes its copy of
the environment, and LMDB's abort would free the parent's reader slot), and
LMDB lets a process adopt a map another process grew only with none of its
transactions open.  Both pause: new transactions wait, those in flight
finish.

On every transaction, so without a lock: ``next()`` on a count is atomic,
and a thread counts itself in before it looks at ``_paused``, while a pause
sets ``_paused`` before it looks at the counts, so either the pause sees
the thread in flight or the thread sees the pause.
"""

from __future__ import annotations

import itertools
import threading
import time


def in_flight(entered: itertools.count, left: itertools.count) -> int:
    """How many have entered and not left, or more (never fewer), from two
    counts each taken once on the way in and once on the way out.  Reading
    a count takes a number from it; both are read once, so the difference
    holds, and ``left`` is read first: one that enters and leaves between
    the two reads is counted as in flight, never one in flight as gone."""
    gone = next(left)
    return next(entered) - gone


class Gate:
    """The in-flight count and pauses of one Index (a mixin: these run on
    every transaction, so they cost no more than a method of the Index)."""

    def _new_gate(self) -> None:
        # Transactions in flight, so a pause can wait for none.
        self._entered, self._left = itertools.count(), itertools.count()
        self._paused = False
        self._pauses = 0
        self._pause_lock = threading.Lock()
        self._resumed = threading.Event()
        self._resumed.set()

    def _enter(self) -> None:
        next(self._entered)
        if self._paused:
            self._wait_while_paused()

    def _leave(self) -> None:
        next(self._left)

    def _wait_while_paused(self) -> None:
        next(self._left)
        while True:
            self._resumed.wait()
            next(self._entered)
            if not self._paused:
                return
            next(self._left)

    def _inflight(self) -> int:
        """Transactions in flight, or more (never fewer): in_flight."""
        return in_flight(self._entered, self._left)

    def _pause(self, deadline: float) -> bool:
        """Hold new transactions back and wait (until ``deadline``) for
        those in flight; True when none is left.  End with _unpause."""
        with self._pause_lock:
            self._pauses += 1
            self._resumed.clear()
            self._paused = True
        while self._inflight() and time.monotonic() < deadline:
            time.sleep(0.0005)  # lets the threads in flight finish
        return not self._inflight()

    def _unpause(self) -> None:
        with self._pause_lock:
            self._pauses -= 1
            if self._pauses == 0:
                self._paused = False
                self._resumed.set()
