"""Bad input to every command: exit status 2 (or 1), exactly one line on stderr naming the field, option or file,
and never a traceback. Runs in-process (``pipesim.cli.main``); nothing here starts an MPI job or any compute."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipesim import cli

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "scenarios" / "local-tiny.yaml")
STUDY = str(ROOT / "scenarios" / "studies" / "acceptance.yaml")


@pytest.fixture
def files(tmp_path):
    """Paths of small bad files, made on demand by name."""
    good = Path(TINY).read_text()

    def make(kind: str) -> str:
        path = tmp_path / kind
        if kind == "folder":
            path.mkdir(exist_ok=True)
        elif kind == "plain-file":
            path.write_text("not a folder\n")
        elif kind == "binary":
            path.write_bytes(bytes(range(256)) * 4)
        elif kind == "latin1":
            path.write_bytes("name: caf\xe9\n".encode("latin-1"))
        elif kind == "syntax":
            path.write_text("models:\n  target: tiny-llama\n  draft: [tiny-llama\ncluster: {count: 2}\n")
        elif kind == "duplicate":
            path.write_text(good + "\nnetwork:\n  bandwidth: 1Gbit/s\n")
        elif kind == "duplicate-nested":
            path.write_text(good.replace("  alpha: 0.7\n", "  alpha: 0.7\n  alpha: 0.2\n"))
        elif kind == "empty":
            path.write_text("")
        elif kind == "list":
            path.write_text("- 1\n- 2\n")
        elif kind == "grid-scalar-alphas":
            path.write_text("alphas: 0.5\n")
        elif kind == "grid-unknown":
            path.write_text("alpha: [0.5]\n")
        elif kind == "grid-bad-alpha":
            path.write_text("alphas: [0.5, 1.5]\n")
        elif kind == "grid-bool-tokens":
            path.write_text("generate_tokens: true\n")
        return str(path)

    return make


def _must_not_start(*args, **kwargs):
    raise AssertionError("the command started its work on bad input")


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = cli.main(argv)
    except SystemExit as stop:  # argparse
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.err


# (argv with <placeholders> for files, text the one error line must contain)
CASES = {
    # scenario files
    "scenario missing": (["simulate", "nope.yaml"], "nope.yaml"),
    "scenario is a folder": (["simulate", "<folder>"], "is a folder"),
    "scenario is binary": (["simulate", "<binary>"], "binary file"),
    "scenario not utf-8": (["simulate", "<latin1>"], "not UTF-8"),
    "scenario YAML syntax": (["simulate", "<syntax>"], "line 4, column 8"),
    "scenario duplicate section": (["simulate", "<duplicate>"], "duplicate key 'network'"),
    "scenario duplicate nested key": (["simulate", "<duplicate-nested>"], "duplicate key 'alpha'"),
    "scenario empty": (["simulate", "<empty>"], "is empty"),
    "scenario is a list": (["simulate", "<list>"], "must be a YAML mapping"),
    "study given as scenario": (["simulate", STUDY], "is a study"),
    "study given to run": (["run", STUDY], "is a study"),
    # scenario values
    "latency inf": (["simulate", TINY, "--set", "network.latency=.inf"], "network.latency"),
    "latency overflow": (["simulate", TINY, "--set", "network.latency=1e999s"], "network.latency"),
    "bandwidth inf": (["simulate", TINY, "--set", "network.bandwidth=.inf"], "network.bandwidth"),
    "kv_bytes inf": (["simulate", TINY, "--set", "models.kv_bytes=.inf"], "models.kv_bytes"),
    "alpha nan": (["simulate", TINY, "--set", "acceptance.alpha=.nan"], "acceptance.alpha"),
    "flops inf": (["simulate", TINY, "--set", "cluster.flops=.inf"], "cluster.flops"),
    "alpha boolean": (["simulate", TINY, "--set", "acceptance.alpha=true"], "acceptance.alpha"),
    "count boolean": (["simulate", TINY, "--set", "cluster.count=true"], "cluster.count"),
    "alphas with a boolean": (["simulate", TINY, "--set", "acceptance.alphas=[0.5, true]"], "acceptance.alphas"),
    "timeout boolean": (["simulate", TINY, "--set", "executor.timeout_s=true"], "executor.timeout_s"),
    "layer split sum": (["simulate", TINY, "--set", "placement.layer_split=[0.2, 0.3]"], "sums to 0.5"),
    "extra key": (["simulate", TINY, "--set", "network.bandwith=1Gbit/s"], "network.bandwith"),
    "zero tokens": (["simulate", TINY, "--set", "workload.generate_tokens=0"], "workload.generate_tokens"),
    "set without value": (["simulate", TINY, "--set", "network.latency"], "--set"),
    "set bad YAML": (["simulate", TINY, "--set", "network.latency=[1"], "--set network.latency"),
    "simulate too many tokens": (["simulate", TINY, "--set", "workload.generate_tokens=10000000",
                                  "--set", "cluster.count=4"], "generate_tokens=10000000"),
    # output paths, checked before the work
    "simulate records folder": (["simulate", TINY, "--records", "<folder>"], "--records"),
    "simulate records under a file": (["simulate", TINY, "--records", "<plain-file>/r.csv"], "is a file"),
    "simulate trace folder": (["simulate", TINY, "--trace", "<folder>"], "--trace"),
    # run (refused by the front end: no mpiexec starts)
    "run ranks 0": (["run", TINY, "--ranks", "0"], "--ranks"),
    "run ranks not an integer": (["run", TINY, "--ranks", "two"], "--ranks"),
    "run ranks mismatch": (["run", TINY, "--ranks", "3"], "cluster.count=2"),
    "run timeout 0": (["run", TINY, "--timeout", "0"], "--timeout"),
    "run timeout nan": (["run", TINY, "--timeout", "nan"], "--timeout"),
    "run records folder": (["run", TINY, "--records", "<folder>"], "--records"),
    "run save-trace folder": (["run", TINY, "--save-trace", "<folder>"], "--save-trace"),
    "run trace under a file": (["run", TINY, "--trace", "<plain-file>/t.json"], "is a file"),
    "run too many tokens": (["run", TINY, "--set", "workload.generate_tokens=10000000"], "generate_tokens=10000000"),
    "run bad value": (["run", TINY, "--set", "acceptance.alpha=2"], "acceptance.alpha"),
    # calibrate / validate
    "calibrate repeats 0": (["calibrate", TINY, "--out", "p.yaml", "--repeats", "0"], "--repeats"),
    "calibrate ranks 0": (["calibrate", TINY, "--out", "p.yaml", "--ranks", "0"], "--ranks"),
    "calibrate timeout negative": (["calibrate", TINY, "--out", "p.yaml", "--timeout", "-1"], "--timeout"),
    "calibrate out folder": (["calibrate", TINY, "--out", "<folder>"], "--out"),
    "validate tokens 0": (["validate", "p.yaml", "--out", "v", "--tokens", "0"], "--tokens"),
    "validate rounds 0": (["validate", "p.yaml", "--out", "v", "--rounds", "0"], "--rounds"),
    "validate out is a file": (["validate", "p.yaml", "--out", "<plain-file>"], "not a folder"),
    "validate grid alphas scalar": (["validate", "p.yaml", "--out", "<folder>/v", "--grid", "<grid-scalar-alphas>"],
                                    "alphas must be a non-empty list"),
    "validate grid unknown field": (["validate", "p.yaml", "--out", "<folder>/v", "--grid", "<grid-unknown>"],
                                    "unknown grid field"),
    "validate grid alpha range": (["validate", "p.yaml", "--out", "<folder>/v", "--grid", "<grid-bad-alpha>"],
                                  "1.5"),
    "validate grid boolean": (["validate", "p.yaml", "--out", "<folder>/v", "--grid", "<grid-bool-tokens>"],
                              "generate_tokens"),
    "validate grid binary": (["validate", "p.yaml", "--out", "<folder>/v", "--grid", "<binary>"], "binary file"),
    "validate grid missing": (["validate", "p.yaml", "--out", "<folder>/v", "--grid", "nogrid.yaml"],
                              "nogrid.yaml"),
    "validate profile binary": (["validate", "<binary>", "--out", "<folder>/v"], "binary file"),
    "validate profile folder": (["validate", "<folder>", "--out", "<folder>/v"], "is a folder"),
    "validate profile YAML syntax": (["validate", "<syntax>", "--out", "<folder>/v"], "line 4, column 8"),
    "scenario profile binary": (["simulate", TINY, "--set", "cluster.profile=<binary>"], "binary file"),
    "calibrate raw missing": (["calibrate", TINY, "--out", "p.yaml", "--from-raw", "raw.json"], "raw.json"),
    "calibrate raw not JSON": (["calibrate", TINY, "--out", "p.yaml", "--from-raw", "<syntax>"],
                               "not valid JSON (line 1, column 1"),
    # models train-exit: refused before any data generation
    "train-exit holdout 1.5": (["models", "train-exit", "--layer", "2", "--holdout", "1.5"], "--holdout"),
    "train-exit holdout 0": (["models", "train-exit", "--layer", "2", "--holdout", "0"], "--holdout"),
    "train-exit tokens 0": (["models", "train-exit", "--layer", "2", "--tokens", "0"], "--tokens"),
    "train-exit lr 0": (["models", "train-exit", "--layer", "2", "--lr", "0"], "--lr"),
    "train-exit threads 0": (["models", "train-exit", "--layer", "2", "--threads", "0"], "--threads"),
    "train-exit out folder": (["models", "train-exit", "--layer", "2", "--out", "<folder>"], "--out"),
    "train-exit out bad template": (["models", "train-exit", "--layer", "2", "--out", "x-{nope}.pt"], "--out"),
    "train-exit summary folder": (["models", "train-exit", "--layer", "2", "--summary", "<folder>"], "--summary"),
    # sweep / report
    "sweep study missing": (["sweep", "nostudy.yaml", "--out", "<folder>/s"], "nostudy.yaml"),
    "sweep study syntax": (["sweep", "<syntax>", "--out", "<folder>/s"], "line 4, column 8"),
    "sweep scenario as study": (["sweep", TINY, "--out", "<folder>/s"], "is a scenario, not a study"),
    "sweep out is a file": (["sweep", STUDY, "--out", "<plain-file>"], "not a folder"),
    "sweep jobs 0": (["sweep", STUDY, "--out", "<folder>/s", "--jobs", "0"], "--jobs"),
    "report out is a file": (["report", "<folder>", "--out", "<plain-file>"], "not a folder"),
    # unknown commands and options
    "unknown option": (["simulate", TINY, "--bandwidth", "1"], "--bandwidth"),
    "unknown strategy": (["simulate", TINY, "--strategy", "fastest"], "--strategy"),
    "variant of another strategy": (["simulate", TINY, "--set", "strategy.name=iterative",
                                     "--set", "strategy.variant=continuous"], "strategy.variant='continuous'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_naming_it(case, files, capsys, tmp_path, monkeypatch):
    argv_template, expected = CASES[case]
    for target in ("pipesim.executor.launcher.run_job", "pipesim.models.commands._load_for_training",
                   "pipesim.calibration.validate.run_executor", "pipesim.calibration.calibrate.probe_command",
                   "pipesim.calibration.calibrate.fit_profile"):
        monkeypatch.setattr(target, _must_not_start)  # bad input is refused before any work
    for target in ("pipesim.limits.machine_memory", "pipesim.executor.limits.machine_memory"):
        monkeypatch.setattr(target, lambda: (16 * 10**9, 8 * 10**9))  # a 16 GB machine, whatever runs this
    monkeypatch.chdir(tmp_path)  # relative outputs (p.yaml, v) land in the test's folder
    argv = []
    for arg in argv_template:
        while "<" in arg:
            start, end = arg.index("<"), arg.index(">")
            arg = arg[:start] + files(arg[start + 1:end]) + arg[end + 1:]
        argv.append(arg)
    code, err = run_cli(argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code in (1, 2), (code, err)
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert expected in lines[0], lines[0]
