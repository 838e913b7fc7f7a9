"""A sweep's output folder: one writer at a time, one study per folder, every file replaced atomically.

- ``.sweep.lock`` holds a POSIX record lock while a sweep writes the folder (the kernel drops it when the process
  ends, ``kill -9`` included); a second sweep into the same folder is refused with the holder's pid and study.
- a folder that holds another study's results is refused unless the sweep is forced (``--force``).
- files are written under a unique temporary name beside the target, then renamed over it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # not POSIX: no lock (one sweep per folder is then the user's business)
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".sweep.lock"
PARTIAL_SUFFIX = ".partial"
PARTS_PREFIX = ".parts-"


class FolderBusyError(ValueError):
    """Another sweep is writing the folder."""


class StudyMismatchError(ValueError):
    """The folder holds the results of a different study."""


def prepare_folder(out: Path) -> None:
    """Create ``out`` (and its parents); one clear error if it is a file or cannot be created."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"--out {out}: cannot create the folder: {error.strerror or error}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: the folder is not writable")


@contextmanager
def locked_folder(out: Path, study: str) -> Iterator[None]:
    """Hold the folder's lock for the duration; refuse at once if another process holds it."""
    if fcntl is None:
        yield
        return
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            raise FolderBusyError(
                f"--out {out}: another sweep is writing this folder (pid {holder.get('pid', '?')}, study "
                f"'{holder.get('study', '?')}', since {holder.get('since', '?')}); wait for it to finish or "
                "give another --out") from None
        os.ftruncate(fd, 0)
        since = datetime.now(timezone.utc).isoformat(timespec="seconds")
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "study": study, "since": since}).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def check_same_study(meta: dict[str, Any], out: Path, name: str, axes: list[str], force: bool) -> None:
    """Refuse to write study ``name`` into a folder whose ``sweep.json`` (``meta``) records another study: one
    with another name or other axes (a study grown by more values, or with another base, is the same study)."""
    held = meta.get("study") or {}
    if not held or force:
        return
    held_name = held.get("name")
    held_axes = [axis.get("name") for axis in held.get("axes", [])]
    if held_name == name and held_axes == axes:
        return
    what = f"study '{held_name}' (axes: {', '.join(map(str, held_axes)) or 'none'}; {meta.get('points', '?')} " \
           f"points, started {meta.get('started', '?')})"
    raise StudyMismatchError(
        f"--out {out} holds the results of {what}, not of study '{name}' (axes: {', '.join(axes) or 'none'}); "
        "give another --out, or add --force to replace them")


def remove_leftovers(out: Path) -> None:
    """Delete the temporary files and part folders of sweeps that were killed (call with the lock held)."""
    for path in out.iterdir():
        if path.name.startswith(PARTS_PREFIX) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.name.startswith(".") and path.name.endswith(PARTIAL_SUFFIX) and path.is_file():
            path.unlink(missing_ok=True)


def write_atomic(target: Path, write: Callable[[Path], None]) -> None:
    """Write ``target`` through ``write(temporary_path)`` under a unique name, then rename it into place."""
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=PARTIAL_SUFFIX)
    os.close(fd)
    os.chmod(name, 0o666 & ~_umask())  # mkstemp makes it private; the result is an ordinary file
    temporary = Path(name)
    try:
        write(temporary)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(target: Path, document: dict[str, Any]) -> None:
    write_atomic(target, lambda path: path.write_text(json.dumps(document, indent=1, default=str)))
