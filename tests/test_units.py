"""The size parser: every unit of ARCHITECTURE.md, relative sizes, and errors a user can act on."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from compressc.units import SizeError, parse_size


@pytest.mark.parametrize(
    "text,expected",
    [("4MB", 4_000_000), ("4MiB", 4_194_304), ("123456", 123456), ("123456B", 123456), ("20KB", 20_000),
     ("20 KiB", 20_480), ("1GB", 10**9), ("1GiB", 2**30), ("0.5mb", 500_000), ("1e3", 1000), ("2.5kb", 2500)],
)
def test_absolute_units(text, expected):
    assert parse_size(text) == expected


def test_relative_units_need_the_original_size():
    assert parse_size("25%", reference=4_000_000) == 1_000_000
    assert parse_size("8x", reference=4_000_000) == 500_000
    with pytest.raises(SizeError, match="relative"):
        parse_size("25%")


@pytest.mark.parametrize("text", ["", "MB", "4 MBs", "four", "-1MB", "0", "4TB", "150%", "0.5x", "nan"])
def test_bad_sizes_say_what_and_how(text):
    with pytest.raises(SizeError) as err:
        parse_size(text, reference=1000, what="--target-size")
    assert "--target-size" in str(err.value) and err.value.exit_code == 2


@given(st.integers(1, 10**12))
def test_plain_integers_are_bytes(n):
    assert parse_size(str(n)) == n == parse_size(f"{n}B")
