"""Parsing of quantities with units as people write them in scenarios: ``1Gbit/s``, ``50us``, ``25GB/s``."""

from __future__ import annotations

import math
import re

_NUMBER = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
_PREFIX = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}
_TIME = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9, "min": 60.0}


def _split(text: str) -> tuple[float, str]:
    if not isinstance(text, str):
        raise ValueError(f"expected a number or a string with a unit, got {text!r}")
    match = re.fullmatch(rf"\s*{_NUMBER}\s*([^\s]*)\s*", text)
    if not match:
        raise ValueError(f"cannot read {text!r} as a number with a unit")
    number = float(match.group(1))
    if not math.isfinite(number):
        raise ValueError(f"{text!r} is not a finite number")
    return number, match.group(2)


def _finite(value: float | int, text: object) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    return float(value)


def parse_bandwidth(value: float | int | str) -> float:
    """Bytes per second from a number (bytes/s) or a string such as ``1Gbit/s``, ``100Mbps``, ``10GB/s``."""
    if isinstance(value, int | float):
        return _finite(value, value)
    number, unit = _split(value)
    match = re.fullmatch(r"([kKMGTP]?)(i?)(bit|b|B|byte)(?:/s|ps)", unit)
    if not match:
        raise ValueError(f"unknown bandwidth unit in {value!r} (use e.g. 1Gbit/s, 100Mbit/s, 10GB/s, 125MB/s)")
    prefix, binary, base = match.groups()
    if binary:
        scale = 1024.0 ** (" KMGTP".index(prefix.upper()) if prefix else 0)
    else:
        scale = _PREFIX[prefix]
    bits = base in ("bit", "b")
    return _finite(number * scale / (8.0 if bits else 1.0), value)


def parse_duration(value: float | int | str) -> float:
    """Seconds from a number (seconds) or a string such as ``50us``, ``1.5ms``, ``2s``."""
    if isinstance(value, int | float):
        return _finite(value, value)
    number, unit = _split(value)
    if unit not in _TIME:
        raise ValueError(f"unknown time unit in {value!r} (use s, ms, us or ns)")
    return _finite(number * _TIME[unit], value)


def parse_rate(value: float | int | str, unit_name: str = "FLOP/s") -> float:
    """A plain rate such as FLOP/s from a number or ``1.2T``, ``400GFLOP/s``."""
    if isinstance(value, int | float):
        return _finite(value, value)
    number, unit = _split(value)
    match = re.fullmatch(r"([kKMGTP]?)(?:FLOP/s|FLOPS|flops|flop/s)?", unit)
    if not match:
        raise ValueError(f"unknown unit in {value!r} (use e.g. 400GFLOP/s or 1.2T)")
    return _finite(number * _PREFIX[match.group(1)], value)


def format_bandwidth(bytes_per_s: float) -> str:
    """Human-readable bits per second, e.g. ``1 Gbit/s``."""
    bits = bytes_per_s * 8
    for scale, name in ((1e12, "Tbit/s"), (1e9, "Gbit/s"), (1e6, "Mbit/s"), (1e3, "kbit/s")):
        if bits >= scale:
            return f"{bits / scale:g} {name}"
    return f"{bits:g} bit/s"


def parse_bytes(value: float | int | str) -> float:
    """Bytes from a number or a string such as ``80GB``, ``80GiB``, ``512MB`` (decimal and binary prefixes)."""
    if isinstance(value, int | float):
        return float(value)
    number, unit = _split(value)
    match = re.fullmatch(r"([kKMGTP]?)(i?)B?", unit)
    if not match or (not match.group(1) and match.group(2)):
        raise ValueError(f"unknown size unit in {value!r} (use e.g. 80GB, 80GiB, 512MB)")
    prefix, binary = match.groups()
    if binary:
        return number * 1024.0 ** (" KMGTP".index(prefix.upper()))
    return number * _PREFIX[prefix]
