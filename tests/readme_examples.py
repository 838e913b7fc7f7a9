"""The README's simulator-only examples, run from a scratch folder (``python tests/readme_examples.py``).

Needs only README command 1's install (no pytest, no torch, no MPI): ``.ci/run`` runs it in a fresh virtual
environment, and ``tests/test_readme_examples.py`` runs it with the suite. Long examples run in reduced form
(fewer generated tokens, one worker); every path an example writes must lie under ``runs/`` (ignored by git).
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIMULATOR_COMMANDS = ("simulate", "sweep", "report", "models list", "--version")
REDUCED = ["--set", "workload.generate_tokens=8"]  # simulate and sweep: a few tokens, the same code paths
OUTPUT_OPTIONS = ("--out", "--trace", "--records")


def readme_commands(readme: Path = ROOT / "README.md") -> list[str]:
    """Every ``pipesim`` command line in the README's bash blocks (comments dropped), in order."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", readme.read_text(), re.DOTALL):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            for part in line.split("&&"):
                part = part.strip()
                if part.startswith("pipesim "):
                    commands.append(part)
    return commands


def simulator_examples(commands: list[str]) -> list[list[str]]:
    """The commands that need only the simulator, as argument lists (without ``pipesim``)."""
    out = []
    for command in commands:
        argv = shlex.split(command)[1:]
        if any(" ".join(argv).startswith(prefix) for prefix in SIMULATOR_COMMANDS):
            out.append(argv)
    return out


def written_paths(argv: list[str]) -> list[str]:
    """What a command line writes (the values of its output options; ``report`` without ``--out`` writes into
    its sweep folder)."""
    paths = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in OUTPUT_OPTIONS]
    if argv[0] == "report" and "--out" not in argv:
        paths.append(argv[1])
    return paths


def reduced(argv: list[str]) -> list[str]:
    """The same example with fewer generated tokens (sweep: one worker, no progress bar)."""
    if argv[0] == "simulate" and "--help" not in argv:
        return argv + REDUCED
    if argv[0] == "sweep":
        return argv + REDUCED + ["--jobs", "1", "--quiet"]
    return argv


def run_examples(workdir: Path) -> list[str]:
    """Run every simulator example in ``workdir`` (with ``scenarios/`` linked in); returns what ran."""
    from pipesim.cli import main

    examples = simulator_examples(readme_commands())
    if not examples:
        raise AssertionError("README.md has no simulator examples")
    (workdir / "scenarios").symlink_to(ROOT / "scenarios", target_is_directory=True)
    ran, here = [], Path.cwd()
    os.chdir(workdir)
    try:
        for argv in examples:
            outside = [p for p in written_paths(argv) if not Path(p).parts or Path(p).parts[0] != "runs"]
            if outside:
                raise AssertionError(f"README example `pipesim {shlex.join(argv)}` writes outside runs/: {outside}")
            try:
                status = main(reduced(argv))
            except SystemExit as exit_:  # --help and --version exit through argparse
                status = exit_.code or 0
            if status != 0:
                raise AssertionError(f"README example `pipesim {shlex.join(argv)}` exited with status {status}")
            ran.append(shlex.join(argv))
    finally:
        os.chdir(here)
    return ran


def main() -> int:
    with tempfile.TemporaryDirectory() as scratch:
        ran = run_examples(Path(scratch))
    print(f"{len(ran)} README simulator examples ran", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
