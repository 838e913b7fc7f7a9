"""Units in scenarios, the catalog, and layer placement."""

from __future__ import annotations

import pytest

from pipesim.models.catalog import CATALOG, get_model_spec
from pipesim.placement import split_layers
from pipesim.units import format_bandwidth, parse_bandwidth, parse_duration, parse_rate


@pytest.mark.parametrize("text,bytes_per_s", [
    ("1Gbit/s", 125e6), ("100Mbit/s", 12.5e6), ("10GB/s", 10e9), ("125MB/s", 125e6), ("1Gbps", 125e6),
    ("1GiB/s", 1024 ** 3), (1000, 1000.0), ("1.5e3B/s", 1500.0),
])
def test_parse_bandwidth(text, bytes_per_s):
    assert parse_bandwidth(text) == pytest.approx(bytes_per_s)


@pytest.mark.parametrize("text,seconds", [("50us", 50e-6), ("1.5ms", 1.5e-3), ("2s", 2.0), ("10ns", 1e-8), (0.1, 0.1)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["fast", "10 parsecs", "1Gbit"])
def test_bad_units_raise(bad):
    with pytest.raises(ValueError):
        parse_bandwidth(bad)


def test_rates_and_formatting():
    assert parse_rate("400G") == 400e9 and parse_rate("1.2TFLOP/s") == 1.2e12
    assert format_bandwidth(125e6) == "1 Gbit/s"


def test_catalog_published_sizes():
    # parameter counts within 3% of the published sizes
    for name, billions in [("llama-2-7b", 6.74), ("llama-2-13b", 13.0), ("llama-2-70b", 69.0),
                           ("llama-3.1-8b", 8.03), ("tinyllama-1.1b", 1.1), ("smollm2-135m", 0.135),
                           ("falcon-7b", 7.2), ("falcon-180b", 180.0)]:
        assert get_model_spec(name).n_params / 1e9 == pytest.approx(billions, rel=0.04), name
    assert len(CATALOG) >= 9


def test_quantization_and_unknowns():
    assert get_model_spec("llama-2-70b").quantized("q3_k_m").bytes_per_weight == pytest.approx(3.91 / 8)
    with pytest.raises(ValueError, match="unknown quantization"):
        get_model_spec("llama-2-7b").quantized("q1")
    with pytest.raises(ValueError, match="unknown model 'gpt-9'"):
        get_model_spec("gpt-9")


@pytest.mark.parametrize("n_layers,fractions,expected", [
    (80, [0.1] + [0.9 / 7] * 7, [(0, 8), (8, 18), (18, 29), (29, 39), (39, 49), (49, 59), (59, 70), (70, 80)]),
    (4, None, [(0, 1), (1, 2), (2, 3), (3, 4)]),
    (30, [1, 1], [(0, 15), (15, 30)]),
    (5, [0.01, 0.01, 10], [(0, 1), (1, 2), (2, 5)]),
])
def test_split_layers(n_layers, fractions, expected):
    n_stages = None if fractions else len(expected)
    ranges = split_layers(n_layers, fractions, n_stages)
    assert ranges == expected
    assert all(b > a for a, b in ranges) and ranges[-1][1] == n_layers


def test_split_layers_rejects_more_stages_than_layers():
    with pytest.raises(ValueError, match="more than the model's 2 layers"):
        split_layers(2, [1, 1, 1])
