"""Kubernetes resource quantities ("500m", "20Gi", "1e3") as exact decimals."""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation

SUFFIXES = {
    "": Decimal(1),
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "k": Decimal("1e3"),
    "M": Decimal("1e6"),
    "G": Decimal("1e9"),
    "T": Decimal("1e12"),
    "P": Decimal("1e15"),
    "E": Decimal("1e18"),
    "Ki": Decimal(2**10),
    "Mi": Decimal(2**20),
    "Gi": Decimal(2**30),
    "Ti": Decimal(2**40),
    "Pi": Decimal(2**50),
    "Ei": Decimal(2**60),
}
QUANTITY = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)([a-zA-Z]*)$")


def parse_quantity(value: str | int | float) -> Decimal:
    """The value of a quantity in base units (cores, bytes); ValueError when malformed."""
    match = QUANTITY.match(str(value).strip())
    if not match or match.group(2) not in SUFFIXES:
        raise ValueError(f"not a quantity: {value!r}")
    try:
        return Decimal(match.group(1)) * SUFFIXES[match.group(2)]
    except InvalidOperation as error:
        raise ValueError(f"not a quantity: {value!r}") from error


def ceil_divide(value: str | int | float, divisor: str | int | float) -> int:
    """``value / divisor`` rounded up, as the downward API reports resources."""
    return math.ceil(parse_quantity(value) / parse_quantity(divisor))
