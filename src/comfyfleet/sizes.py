"""Byte sizes as people write them (``10GB``, ``1.5GiB``, ``500MB``, ``1024``) and as we print them.

One convention, the one the rest of comfyfleet uses (``profiles.GB`` is 10^9): decimal
units are powers of 1000 (``kB``, ``MB``, ``GB``, ``TB``, ``PB``; ``10GB`` is 10 x 10^9
bytes) and binary units powers of 1024 (``KiB``, ``MiB``, ``GiB``, ``TiB``, ``PiB``;
``1.5GiB`` is 1.5 x 2^30 bytes). Units are read case-insensitively (``10gb`` is
``10GB``), the trailing ``B`` may be left out (``10G``, ``10Gi``, as Kubernetes writes
them), and a bare number is bytes. The seeds' agent read every unit as a power of 1024;
here ``GB`` and ``GiB`` each keep their own meaning, so a seed's ``50GB`` cap is about
7% smaller (46.6 GiB): write ``50GiB`` for the seed's number.

Standard library only: the agent imports it.
"""

from __future__ import annotations

import math
import re
from decimal import ROUND_HALF_UP, Decimal, localcontext
from typing import Final

__all__ = [
    "GB",
    "KB",
    "MAX_SIZE",
    "MB",
    "TB",
    "GiB",
    "KiB",
    "MiB",
    "TiB",
    "format_size",
    "parse_size",
]

KB: Final = 1000
MB: Final = 1000**2
GB: Final = 1000**3
TB: Final = 1000**4
KiB: Final = 1 << 10
MiB: Final = 1 << 20
GiB: Final = 1 << 30
TiB: Final = 1 << 40

# The largest size we accept: a signed 64-bit integer, what SQLite, PostgreSQL's
# BIGINT and every JSON reader we talk to can hold exactly.
MAX_SIZE: Final = (1 << 63) - 1

_EXAMPLE: Final = (
    "write bytes, or a number and a unit: e.g. 10GB (10^9 bytes each), "
    "1.5GiB (2^30 bytes each), 500MB or 1024"
)

_UNITS: Final[dict[str, int]] = {
    "": 1,
    "b": 1,
    "byte": 1,
    "bytes": 1,
    **{prefix: 1000**power for power, prefix in enumerate("kmgtp", start=1)},
    **{f"{prefix}b": 1000**power for power, prefix in enumerate("kmgtp", start=1)},
    **{f"{prefix}i": 1024**power for power, prefix in enumerate("kmgtp", start=1)},
    **{f"{prefix}ib": 1024**power for power, prefix in enumerate("kmgtp", start=1)},
}

_SIZE_RE: Final = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?P<unit>[A-Za-z]*)")


def parse_size(value: str | int | float, *, what: str = "a size") -> int:
    """The number of bytes ``value`` stands for: an int, or a string such as ``10GB``.

    ``GB`` is 10^9 bytes and ``GiB`` 2^30 (see the module's docstring); fractions are
    allowed with a unit (``1.5GiB``) and rounded to the nearest byte. Negative sizes,
    text that is not a size, fractional bytes and sizes beyond ``MAX_SIZE`` raise a
    ``ValueError`` that quotes ``value`` and shows an example; ``what`` names the thing
    being read in that message (``"DM_DYNAMIC_MAX_BYTES"``).
    """
    shown = _shown(value)
    if isinstance(value, bool):
        raise ValueError(f"cannot read {what} from {shown}: {_EXAMPLE}")
    if isinstance(value, int):
        return _checked(value, shown, what)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot read {what} from {shown}: {_EXAMPLE}")
        if value < 0:
            raise ValueError(f"{what} cannot be negative, got {shown}: {_EXAMPLE}")
        if not value.is_integer():
            raise ValueError(
                f"cannot read {what} from {shown}: there are no fractions of a byte; {_EXAMPLE}"
            )
        return _checked(int(value), shown, what)
    if not isinstance(value, str):
        raise ValueError(f"cannot read {what} from {shown}: {_EXAMPLE}")
    text = value.strip()
    if text.startswith("-"):
        raise ValueError(f"{what} cannot be negative, got {shown}: {_EXAMPLE}")
    match = _SIZE_RE.fullmatch(text.removeprefix("+"))
    if match is None:
        raise ValueError(f"cannot read {what} from {shown}: {_EXAMPLE}")
    unit = match["unit"]
    scale = _UNITS.get(unit.lower())
    if scale is None:
        raise ValueError(
            f"cannot read {what} from {shown}: unknown unit {unit!r}; use B, kB, MB, GB, TB, "
            "PB (powers of 1000) or KiB, MiB, GiB, TiB, PiB (powers of 1024), e.g. 10GB or 1.5GiB"
        )
    number = match["number"]
    with localcontext() as exact_arithmetic:
        # Enough digits that the product is exact (the default 28 would round).
        exact_arithmetic.prec = len(number) + 20
        exact = Decimal(number) * scale
    if exact > MAX_SIZE:
        raise ValueError(_too_large(what, shown))
    if scale == 1 and exact != exact.to_integral_value():
        raise ValueError(
            f"cannot read {what} from {shown}: there are no fractions of a byte; {_EXAMPLE}"
        )
    return int(exact.to_integral_value(rounding=ROUND_HALF_UP))


def format_size(n: int) -> str:
    """``n`` bytes for people, in decimal units with one decimal: ``1.5 GB``, ``512 B``.

    The unit is the largest that leaves at least 1 (so never ``1000.0 MB``); negative
    sizes (a difference) keep their sign.
    """
    sign = "-" if n < 0 else ""
    size = abs(n)
    if size < KB:
        return f"{sign}{size} B"
    for unit, scale in (("kB", KB), ("MB", MB), ("GB", GB), ("TB", TB)):
        # Rounded to one decimal, 999,960 bytes would print as "1000.0 kB": move up.
        if round(size / scale, 1) < 1000:
            return f"{sign}{size / scale:.1f} {unit}"
    return f"{sign}{size / 1000**5:.1f} PB"


def _checked(n: int, shown: str, what: str) -> int:
    if n < 0:
        raise ValueError(f"{what} cannot be negative, got {shown}: {_EXAMPLE}")
    if n > MAX_SIZE:
        raise ValueError(_too_large(what, shown))
    return n


def _too_large(what: str, shown: str) -> str:
    return f"{what} is too large, got {shown}: the most is {MAX_SIZE} bytes (2^63 - 1); {_EXAMPLE}"


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
