"""Command-line option types checked at parse time, and a parser whose errors are one line.

Every numeric option is range-checked and every output path is checked writable before any work starts:
``argparse`` turns a ``ValueError``/``ArgumentTypeError`` from these into ``prog: error: argument --x: why``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr (no usage block), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def int_at_least(low: int) -> Callable[[str], int]:
    """An integer option ``>= low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def float_between(low: float, high: float = math.inf, low_open: bool = False,
                  high_open: bool = False) -> Callable[[str], float]:
    """A finite float option in ``[low, high]`` (either end open if asked)."""
    left, right = "(" if low_open else "[", ")" if high_open or math.isinf(high) else "]"
    span = f"{left}{low:g}, {high:g}{right}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        below = value <= low if low_open else value < low
        above = value >= high if high_open else value > high
        if not math.isfinite(value) or below or above:
            raise argparse.ArgumentTypeError(f"must be a number in {span}, got {text}")
        return value

    parse.__name__ = f"number in {span}"
    return parse


positive_float = float_between(0.0, low_open=True)


def _first_existing(path: Path) -> Path:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def check_output_file(text: str) -> str:
    """A file this process can create or overwrite (the folders above it are created when it is written)."""
    path = Path(text).expanduser()
    if path.is_dir() or text.endswith(("/", os.sep)):
        raise argparse.ArgumentTypeError(f"{text}: is a folder, expected a file name")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise argparse.ArgumentTypeError(f"{text}: exists and is not writable")
        return text
    _check_parent(text, path.parent if str(path.parent) else Path("."))
    return text


def check_output_dir(text: str) -> str:
    """A folder this process can create or write into."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: exists and is not a folder")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise argparse.ArgumentTypeError(f"{text}: the folder is not writable")
        return text
    _check_parent(text, path.parent)
    return text


def _check_parent(text: str, parent: Path) -> None:
    existing = _first_existing(parent.absolute())
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: {existing} is a file, so the folder cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text}: cannot create anything in {existing} (not writable)")


def fail(prog: str, message: str) -> NoReturn:
    """Print ``prog: error: message`` (one line) and exit 2."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)
