"""The machine-load sampler: steal and busy shares from /proc/stat deltas, load average over a window."""

from __future__ import annotations

import pytest

from pipesim.calibration.machine_load import (
    LoadSampler,
    Sample,
    busy_warning,
    parse_loadavg,
    parse_stat,
    window_figures,
)

STAT = "cpu  100 5 50 800 10 3 2 30 0 0\ncpu0 50 2 25 400 5 1 1 15 0 0\nintr 1 2 3\n"


def test_parse_stat_reads_the_aggregate_line_in_field_order():
    assert parse_stat(STAT) == (100, 5, 50, 800, 10, 3, 2, 30)
    assert parse_stat("cpu 1 2 3 4\n") == (1, 2, 3, 4, 0, 0, 0, 0)  # old kernels: fewer fields
    with pytest.raises(ValueError, match="cpu"):
        parse_stat("intr 1\n")


def test_parse_loadavg():
    assert parse_loadavg("6.67 6.60 4.85 7/136 3533\n") == 6.67


def test_window_figures_are_the_tick_deltas_by_hand():
    # between t=1 and t=3: user +60, system +20, idle +90, iowait +10, steal +20 -> total 200
    samples = [Sample(0.0, (0, 0, 0, 0, 0, 0, 0, 0), 9.0), Sample(1.0, (10, 0, 5, 100, 0, 0, 0, 5), 1.0),
               Sample(2.0, (40, 0, 15, 150, 5, 0, 0, 15), 3.0), Sample(3.0, (70, 0, 25, 190, 10, 0, 0, 25), 2.0)]
    figures = window_figures(samples, 1.0, 3.0)
    assert figures["steal_fraction"] == pytest.approx(20 / 200)
    assert figures["busy_fraction"] == pytest.approx(80 / 200)
    assert figures["load1_mean"] == pytest.approx(2.0) and figures["load1_max"] == 3.0
    # a window inside one interval spans the two readings around it
    inside = window_figures(samples, 1.2, 1.4)
    assert inside["samples"] == 2 and inside["steal_fraction"] == pytest.approx(10 / 105)  # s1 -> s2


def test_too_few_samples_give_no_figures():
    assert window_figures([])["steal_fraction"] is None


def test_the_sampler_reads_a_fake_proc(tmp_path):
    (tmp_path / "stat").write_text(STAT)
    (tmp_path / "loadavg").write_text("1.50 1.0 1.0 1/1 1\n")
    with LoadSampler(interval_s=0.01, proc=tmp_path) as sampler:
        (tmp_path / "stat").write_text("cpu  150 5 50 830 10 3 2 50 0 0\n")
    figures = sampler.figures()
    assert figures["steal_fraction"] == pytest.approx(20 / 100)  # user +50, idle +30, steal +20
    assert figures["load1_max"] == 1.5


def test_a_probe_on_a_machine_busier_than_its_cpus_is_warned_about():
    quiet = {"load1_mean": 0.4, "load1_max": 0.7, "cpus": 2, "steal_fraction": 0.0}
    exactly_full = {**quiet, "load1_mean": 2.0}
    busy = {**quiet, "load1_mean": 7.0}  # the loaded probes of 2026-12-02 ran at 7.0 on 2 CPUs
    assert busy_warning(quiet) is None
    assert busy_warning(exactly_full) is None
    assert busy_warning(None) is None and busy_warning({"load1_mean": None, "cpus": 2}) is None
    warning = busy_warning(busy)
    assert warning is not None and "load 7.0 on 2 CPUs" in warning
