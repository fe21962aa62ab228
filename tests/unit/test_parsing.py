"""Settings as LMCache and vLLM configurations spell them."""

import pytest

from slabcache import ConfigError
from slabcache.integrations.parsing import parse_seconds


@pytest.mark.parametrize("given,want", [(1, 1.0), (0, 0.0), (2.5, 2.5), ("2.5", 2.5), (" 3 ", 3.0)])
def test_seconds_come_as_numbers_or_numeric_strings(given, want):
    assert parse_seconds("the setting", given) == want


@pytest.mark.parametrize("bad", ["soon", "", -1, "-0.5", True, None, float("nan"), "inf", [1]])
def test_anything_else_names_the_setting(bad):
    with pytest.raises(ConfigError, match=r"^the setting must be a number of seconds >= 0, got "):
        parse_seconds("the setting", bad)
