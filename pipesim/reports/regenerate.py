"""Regenerate the kept simulator reports in ``reports/`` from the current code: ``python -m pipesim.reports.regenerate``.

Each kept report is a shipped study swept from scratch (``--force``) into a working folder under ``runs/``, then
turned into its report in ``reports/<name>``. Only simulated results are regenerated: they are deterministic, and
``tests/test_kept_reports.py`` checks that the kept tables are what the current code produces. The calibration
results in ``reports/calibration`` are measurements of one machine (timing) and are not regenerated here or in CI;
``reports/calibration/README.md`` records the commands that made them.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class KeptReport:
    """A report kept in the repository: the study that makes it and where it lives."""

    name: str
    study: str  # relative to the repository root
    report: str  # relative to the repository root
    failed_points: bool = False  # the study holds points that fail on purpose (e.g. a model that does not fit)
    module: str = "pipesim.cli"  # the module that runs its commands (a study with a report of its own: its module)
    more_studies: tuple[str, ...] = ()  # such a module's further study files
    study_args: bool = True  # such a module takes its study files as arguments (else it knows them itself)

    def commands(self, work: Path) -> list[list[str]]:
        """The command lines (without ``python -m MODULE``) that regenerate it."""
        if self.module != "pipesim.cli":
            studies = [self.study, *self.more_studies] if self.study_args else []
            return [[*studies, "--out", self.report]]
        sweep_dir = str(work / self.name)
        return [["sweep", self.study, "--out", sweep_dir, "--force", "--quiet"],
                ["report", sweep_dir, "--out", self.report]]


KEPT_REPORTS: tuple[KeptReport, ...] = (
    KeptReport("bandwidth", "scenarios/studies/bandwidth.yaml", "reports/bandwidth"),
    KeptReport("cluster-70b", "scenarios/studies/cluster-70b.yaml", "reports/cluster-70b", failed_points=True),
    KeptReport("pipespec", "scenarios/studies/pipespec.yaml", "reports/pipespec",
               module="pipesim.reports.pipespec_study", more_studies=("scenarios/studies/pipespec-cpu.yaml",)),
    KeptReport("pipeinfer-reference", "scenarios/studies/pipeinfer-reference.yaml", "reports/pipeinfer-reference",
               module="pipesim.reports.pipeinfer_reference", more_studies=("scenarios/studies/pipeinfer-ablation.yaml",),
               study_args=False),
)


def regenerate(names: Sequence[str] = (), work: Path = Path("runs/regenerate"), root: Path = ROOT) -> list[str]:
    """Re-sweep and re-report the kept reports named (all when empty), from ``root`` (so the reports name
    repository-relative paths); returns the commands that ran."""
    known = {kept.name: kept for kept in KEPT_REPORTS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown kept report(s) {unknown} (known: {', '.join(known)})")
    ran = []
    here = Path.cwd()
    os.chdir(root)
    try:
        for kept in [known[n] for n in names] or list(KEPT_REPORTS):
            for argv in kept.commands(work):
                program = "pipesim" if kept.module == "pipesim.cli" else f"python -m {kept.module}"
                ran.append(f"{program} " + " ".join(argv))
                print(ran[-1], file=sys.stderr, flush=True)
                status = subprocess.run([sys.executable, "-m", kept.module, *argv], check=False).returncode
                if status != 0 and not (status == 1 and argv[0] == "sweep" and kept.failed_points):
                    raise RuntimeError(f"`{ran[-1]}` exited with status {status}")
    finally:
        os.chdir(here)
    return ran


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipesim.reports.regenerate",
        description="Regenerate the kept simulator reports in reports/ with the current code (the calibration "
                    "results are measured and are not regenerated).")
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"kept reports to regenerate (default: all: {', '.join(k.name for k in KEPT_REPORTS)})")
    parser.add_argument("--work", default="runs/regenerate", metavar="DIR",
                        help="working folder for the sweeps, relative to the repository root (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        regenerate(args.names, Path(args.work))
    except (ValueError, RuntimeError) as error:
        print(f"pipesim: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
