"""Testing helpers: the documented seam for breaking a store on purpose.

``faults``   FaultyEngine (open with ``engine_wrapper=FaultyEngine``), inject
``harness``  crash loops, corruption trials, thread hammering
``values``   key-derived values (``expected``), ``verify``, ``child_env``

Used by tests/ and tools/; nothing in the store imports this package.
"""

from .faults import FaultyEngine, inject
from .harness import (
    CorruptionReport, CrashReport, corruption_trials, crash_loop, hammer, scratch_dir,
)
from .values import child_env, expected, verify

__all__ = [
    "CorruptionReport", "CrashReport", "FaultyEngine", "child_env", "corruption_trials",
    "crash_loop", "expected", "hammer", "inject", "scratch_dir", "verify",
]
