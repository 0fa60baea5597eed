"""Sizes as people write them: GB is 10^9 bytes, GiB 2^30, and mistakes say what to write."""

from __future__ import annotations

import pytest

from comfyfleet.sizes import GB, MAX_SIZE, MB, TB, GiB, KiB, MiB, TiB, format_size, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10GB", 10 * GB),
        ("10 GB", 10 * GB),
        ("10gb", 10 * GB),
        ("10G", 10 * GB),
        ("500MB", 500 * MB),
        ("2TB", 2 * TB),
        ("1.5kB", 1500),
        ("1.5GiB", 1_610_612_736),
        ("1.5gib", 1_610_612_736),
        ("10Gi", 10 * GiB),
        ("500MiB", 500 * MiB),
        ("2TiB", 2 * TiB),
        ("4KiB", 4 * KiB),
        ("1024", 1024),
        ("1024B", 1024),
        ("1024 bytes", 1024),
        ("0", 0),
        ("0GB", 0),
        (" 7 ", 7),
        ("+3kB", 3000),
        (".5GB", 500 * MB),
    ],
)
def test_parse_size_reads_decimal_and_binary_units_each_with_its_own_meaning(
    text: str, expected: int
) -> None:
    assert parse_size(text) == expected


def test_parse_size_takes_ints_and_whole_floats_as_bytes() -> None:
    assert parse_size(10 * GB) == 10 * GB
    assert parse_size(0) == 0
    assert parse_size(1e9) == GB
    assert parse_size(MAX_SIZE) == MAX_SIZE


def test_parse_size_rounds_a_fraction_of_a_unit_to_the_nearest_byte_exactly() -> None:
    assert parse_size("1.0004kB") == 1000
    assert parse_size("1.0005kB") == 1001
    assert parse_size("9223372036854775.807kB") == MAX_SIZE


@pytest.mark.parametrize("value", ["-5GB", " -1", -1, -0.5])
def test_parse_size_refuses_negative_sizes_quoting_the_input(value: str | int | float) -> None:
    with pytest.raises(ValueError, match="cannot be negative") as caught:
        parse_size(value)
    assert repr(value) in str(caught.value)
    assert "10GB" in str(caught.value)


@pytest.mark.parametrize("value", ["abc", "", "GB", "1 2", "1e9", "10,000", "0x10", "ten GB"])
def test_parse_size_refuses_text_that_is_not_a_size_with_an_example(value: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_size(value, what="DM_DYNAMIC_MAX_BYTES")
    message = str(caught.value)
    assert message.startswith(f"cannot read DM_DYNAMIC_MAX_BYTES from {value!r}")
    assert "e.g. 10GB" in message


def test_parse_size_names_an_unknown_unit_and_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown unit 'XB'.*GiB") as caught:
        parse_size("10XB")
    assert "'10XB'" in str(caught.value)


@pytest.mark.parametrize("value", ["1.5", "1.5B", 1.5])
def test_parse_size_refuses_fractions_of_a_byte(value: str | float) -> None:
    with pytest.raises(ValueError, match="no fractions of a byte"):
        parse_size(value)


@pytest.mark.parametrize(
    "value", [MAX_SIZE + 1, "9223372036854775808", "10000000PB", "99999999999999999999999GiB", 1e30]
)
def test_parse_size_refuses_sizes_beyond_a_signed_64_bit_integer(value: str | int | float) -> None:
    with pytest.raises(ValueError, match=r"too large.*2\^63 - 1"):
        parse_size(value)


@pytest.mark.parametrize("value", [True, float("nan"), float("inf")])
def test_parse_size_refuses_booleans_and_non_finite_floats(value: bool | float) -> None:
    with pytest.raises(ValueError, match="cannot read a size"):
        parse_size(value)


def test_parse_size_shortens_a_long_input_in_its_message() -> None:
    with pytest.raises(ValueError) as caught:
        parse_size("x" * 500)
    assert len(str(caught.value)) < 250


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (999, "999 B"),
        (1000, "1.0 kB"),
        (1_500_000_000, "1.5 GB"),
        (2_100_000_000, "2.1 GB"),
        (999_949, "999.9 kB"),
        (999_950, "1.0 MB"),
        (10**12, "1.0 TB"),
        (3 * 10**15, "3.0 PB"),
        (-1_500_000_000, "-1.5 GB"),
    ],
)
def test_format_size_prints_decimal_units_with_one_decimal(n: int, text: str) -> None:
    assert format_size(n) == text


def test_format_size_reads_back_as_about_the_same_size() -> None:
    for n in (1, 999, 12_345, 6 * GB, 1_610_612_736, 7 * TB):
        assert abs(parse_size(format_size(n).replace(" ", "")) - n) <= n * 0.05 + 1
