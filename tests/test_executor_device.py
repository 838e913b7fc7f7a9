"""``executor.device`` and ``executor.pin_ranks``: stages on a torch device with host (numpy) messages, and
ranks bound to cores. These run on the CPU with ``device=cpu`` explicitly; CUDA cases skip where torch sees no
GPU (``benchmarks/gpu_validation.sh`` runs the executor on one)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipesim.executor.affinity import allowed_cpus, core_for, cores_for
from pipesim.scenario import ScenarioError, load_scenario

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "scenarios" / "local-tiny.yaml"
NO_CUDA = "needs a CUDA device (torch.cuda.is_available() is False on this machine)"
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA))]


def _pipeline(device: str):
    """The tiny model cut in two stages on ``device``, as two ranks would hold it."""
    from pipesim.executor.device import resolve_device
    from pipesim.executor.modelref import resolve_model
    from pipesim.executor.torch_backend import ModelStore, TorchStage

    ref = resolve_model("tiny-llama", "executor.model", 0)
    store = ModelStore(resolve_device(device))
    half = ref.n_layers // 2
    first = TorchStage(store.stage(ref, 0, half, True, False), 64, 2, "logits", 4)
    last = TorchStage(store.stage(ref, half, ref.n_layers, False, True), 64, 2, "logits", 4)
    return first, last


@pytest.mark.parametrize("device", DEVICES)
def test_stages_on_a_device_pass_host_buffers_and_equal_the_whole_model(device):
    from pipesim.executor.protocol import RunMessage
    from pipesim.models.llama import greedy_generate
    from pipesim.models.tiny import build_tiny_stage, make_tiny_model_weights

    whole = build_tiny_stage(make_tiny_model_weights(seed=0))  # on the CPU, one stage: the reference
    prompt = [5, 77, 200, 31, 8]
    expected = greedy_generate(whole, prompt, 6)
    first, last = _pipeline(device)
    context, out = list(prompt), []
    for _ in range(6):
        start = len(context) - (1 if out else len(prompt))
        tokens = tuple(context[start:])
        msg = RunMessage(len(out) + 1, tokens, tuple(range(start, len(context))), (0,), len(tokens) - 1, ())
        hidden = first.forward(msg, None)
        assert isinstance(hidden, np.ndarray) and hidden.dtype == np.float32  # a host buffer for MPI
        prediction = last.forward(msg, hidden)
        assert isinstance(prediction.values, np.ndarray)
        out.append(int(prediction.values[-1].argmax()))
        context.append(out[-1])
    assert out == expected
    assert first.kv.k.device.type == device and last.kv_cells() == len(context) - 1


def test_auto_is_cuda_exactly_when_torch_sees_a_gpu():
    from pipesim.executor.device import resolve_device

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_without_a_gpu_is_one_clear_error():
    from pipesim.executor.device import DeviceUnavailableError, resolve_device

    with pytest.raises(DeviceUnavailableError, match=r"executor.device=cuda .*torch.cuda.is_available\(\) is False"):
        resolve_device("cuda")


def test_device_setting_is_checked_with_the_scenario():
    assert load_scenario(TINY, ["executor.device=cpu"]).executor.device == "cpu"
    with pytest.raises(ScenarioError, match="executor.device"):
        load_scenario(TINY, ["executor.device=tpu"])


def test_cores_are_dealt_round_robin_over_the_allowed_set():
    assert [core_for(i, [2, 5, 7]) for i in range(5)] == [2, 5, 7, 2, 5]
    assert [cores_for(i, [0, 1, 2, 3], 2) for i in range(3)] == [[0, 1], [2, 3], [0, 1]]  # two threads per rank
    assert cores_for(0, [4], 3) == [4]
    with pytest.raises(ValueError, match="no allowed CPUs"):
        core_for(0, [])


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_setaffinity"), reason="no sched_setaffinity here")
def test_a_pinned_process_runs_on_its_one_core():
    cpus = allowed_cpus()
    code = ("import os, json; from pipesim.executor.affinity import pin_to_core; "
            "core = pin_to_core(1); print(json.dumps([core, sorted(os.sched_getaffinity(0))]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    core, now = json.loads(result.stdout)
    assert core == cpus[1 % len(cpus)] and now == [core]


@pytest.mark.mpi
def test_pinned_ranks_on_the_cpu_device_reproduce_target_only_decoding(tmp_path):
    saved = tmp_path / "traces.json"
    argv = [sys.executable, "-m", "pipesim.cli", "run", str(TINY), "--ranks", "2", "--save-trace", str(saved),
            "--set", "executor.device=cpu", "--set", "executor.pin_ranks=true", "--set", "workload.generate_tokens=12",
            "--variant", "strategy.name=speculative", "--variant", "strategy.name=pipeinfer"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    for entry in json.loads(saved.read_text()):
        meta = entry["trace"]["meta"]
        assert meta["matches_reference"] is True
        assert meta["device"] == "cpu" and meta["pin_ranks"] is True
        cpus = allowed_cpus()
        assert meta["pinned_cores"] == [cpus[0], cpus[1 % len(cpus)]]  # one core each, by rank on the host
        start, end = meta["wall_clock"]
        assert end > start


@pytest.mark.mpi
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_ranks_sharing_one_gpu_reproduce_target_only_decoding(tmp_path):
    saved = tmp_path / "traces.json"
    argv = [sys.executable, "-m", "pipesim.cli", "run", str(TINY), "--ranks", "3", "--set", "cluster.count=3",
            "--save-trace", str(saved),
            "--set", "executor.device=cuda", "--set", "workload.generate_tokens=12",
            "--variant", "strategy.name=iterative", "--variant", "strategy.name=pipeinfer"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    entries = json.loads(saved.read_text())
    assert entries[1]["trace"]["meta"]["matches_reference"] is True
    assert entries[0]["trace"]["output_tokens"] == entries[1]["trace"]["output_tokens"]
    assert all(e["trace"]["meta"]["device"] == "cuda" for e in entries)
