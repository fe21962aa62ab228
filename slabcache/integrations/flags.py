"""Boolean settings as the frameworks spell them.

LMCache and vLLM configurations come from YAML, JSON and environment
variables, so a flag may arrive as a bool, 0/1 or a string.  Shared by the
integrations without importing either framework.
"""

from __future__ import annotations

from ..errors import ConfigError

# The spellings LMCache itself accepts for booleans given as strings.
TRUE_WORDS = ("true", "1")
FALSE_WORDS = ("false", "0")


def parse_bool(name: str, value) -> bool:
    """``True``/``False``, or LMCache's strings ``"true"``/``"false"``/``"1"``/``"0"``
    (any case).  Raises ConfigError for anything else."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
    raise ConfigError(f"{name} must be true or false, got {value!r}")
