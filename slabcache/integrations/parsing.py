"""Settings as the frameworks spell them: flags, seconds and lists of directories.

LMCache and vLLM configurations come from YAML, JSON and environment
variables, so a flag may arrive as a bool, 0/1 or a string, and a list of
directories as a list or a comma-separated string.  Shared by the
integrations without importing either framework; each wraps these in
errors that name its own setting.
"""

from __future__ import annotations

import os

from ..errors import ConfigError
from ..format.sizes import parse_size

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


def parse_seconds(name: str, value) -> float:
    """A number of seconds >= 0, given as a number or a numeric string (YAML
    and environment variables give strings).  Raises ConfigError."""
    seconds = float("nan")  # what fails the range check below
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            seconds = float(value.strip())
        except ValueError:
            seconds = float("nan")
    if not 0 <= seconds < float("inf"):
        raise ConfigError(f"{name} must be a number of seconds >= 0, got {value!r}")
    return seconds


def split_paths(value) -> list[str] | None:
    """``"file:///a/, /b"`` or ``["/a", "/b"]`` -> absolute directories (empty
    entries dropped); None when ``value`` is neither a string nor a list."""
    if isinstance(value, (list, tuple)):
        items = [str(x) for x in value]
    elif isinstance(value, str):
        items = value.split(",")
    else:
        return None
    out = []
    for raw in items:
        p = raw.strip().removeprefix("file://")
        if p:
            out.append(os.path.abspath(p))
    return out


def parse_size_setting(name: str, value) -> int:
    """A size as JSON or YAML gives it: bytes, or a string such as '20G'.
    ``name`` is the setting as the user spells it (for the error)."""
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a size such as '20G' or a number of bytes, got {value!r}")
    if isinstance(value, int):
        return value
    try:
        return parse_size(str(value))
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def parse_choice(name: str, value, choices) -> str:
    """One of ``choices`` (any case).  Raises ConfigError naming ``name``."""
    word = str(value).strip().lower() if isinstance(value, str) else None
    if word not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return word
