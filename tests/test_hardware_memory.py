"""Hardware catalog, model shapes from files, memory fit and the floor cost model, against hand computation
from published shapes and datasheets, and published llama.cpp speeds."""

from __future__ import annotations

import json

import pytest

from pipesim.cli import main
from pipesim.hardware import NETWORK_PRESETS, NODE_TYPES, get_node_type
from pipesim.models.catalog import get_model_spec
from pipesim.models.shapes import model_shape
from pipesim.scenario import ScenarioError, scenario_from_dict
from pipesim.world.costs import FloorCostModel, NodeProfile, RooflineCostModel
from pipesim.world.memory import MemoryFitError, check_memory_fit, memory_plan

# Llama-2-70B's published shape (config.json): 80 layers, d_model 8192, 64 heads, 8 KV heads, ffn 28672, vocab 32000.
L, D, H, KV, F, V = 80, 8192, 64, 8, 28672, 32000
HEAD_DIM = D // H
LAYER_PARAMS = 2 * D * D + 2 * D * KV * HEAD_DIM + 3 * D * F  # q, o; k, v; gate, up, down


def scenario(**changes) -> dict:
    doc = {
        "models": {"target": "llama-2-70b", "target_quantization": "q4_k_m", "kv_bytes": 2},
        "cluster": {"count": 2, "hardware": "a100-80gb"},
        "network": {"preset": "ib-hdr"},
        "placement": {"layer_split": [0.25, 0.75]},
        "workload": {"prompt_tokens": 100, "generate_tokens": 28},
        "strategy": {"name": "iterative"},
    }
    for key, value in changes.items():
        section, _, field = key.partition("__")
        doc[section][field] = value
    return doc


def expected_node_bytes(bits: float, layers: int, embedding_tables: int, cells: int, run: int, logits: int) -> float:
    weights = (layers * LAYER_PARAMS + embedding_tables * V * D) * bits / 8
    kv = layers * 2 * KV * HEAD_DIM * cells * 2
    activations = 4 * (run * (4 * D + 2 * F + H * cells) + logits * V)
    return weights + kv + activations


@pytest.mark.parametrize("quantization,bits", [("q4_k_m", 4.85), ("f16", 16.0)])
def test_llama2_70b_memory_of_a_split(quantization: str, bits: float) -> None:
    plan = memory_plan(scenario_from_dict(scenario(models__target_quantization=quantization)))
    cells = 100 + 28  # iterative: prompt + generated, nothing speculative
    outputs = 1 + 4  # the largest run returns at most max(gamma=4, micro_batch=3) + 1 logits rows
    # 25% of 80 layers on n0 (with the token embeddings), 60 on n1 (with the output head)
    assert plan[0].layers == (0, 20) and plan[1].layers == (20, 80)
    assert plan[0].needed == pytest.approx(expected_node_bytes(bits, 20, 1, cells, 100, 0), rel=1e-9)
    assert plan[1].needed == pytest.approx(expected_node_bytes(bits, 60, 1, cells, 100, outputs), rel=1e-9)
    # sanity against the published file size: Llama-2-70B q4_k_m GGUF is 41.4 GB, f16 138 GB
    total = plan[0].weights + plan[1].weights
    assert total / 1e9 == pytest.approx({"q4_k_m": 41.4, "f16": 138.0}[quantization], rel=0.03)


def test_f16_on_two_a100_40gb_does_not_fit_with_one_line() -> None:
    doc = scenario(models__target_quantization="f16")
    doc["cluster"]["hardware"] = "a100-40gb"
    with pytest.raises(MemoryFitError) as info:
        check_memory_fit(scenario_from_dict(doc))
    message = str(info.value)
    needed = expected_node_bytes(16.0, 60, 1, 128, 100, 5)  # n0's 20 f16 layers (34.9 GB) fit, n1's 60 do not
    assert "\n" not in message and "node n1 (layers 20-79)" in message
    assert f"({needed:.0f} bytes" in message and "(40000000000 bytes)" in message


def test_not_fitting_simulate_exits_2_naming_the_node(capsys, tmp_path) -> None:
    path = tmp_path / "s.yaml"
    doc = scenario(models__target_quantization="f16")
    doc["cluster"]["overrides"] = [{"index": 1, "hardware": "l40s"}]  # 60 f16 layers on a 48 GB card
    path.write_text(json.dumps(doc))
    assert main(["simulate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "node n1" in err and "48.0 GB" in err


def test_pipeinfer_charges_kv_for_the_runs_in_flight() -> None:
    base = scenario(strategy__name="pipeinfer")
    base["models"]["draft"] = "tinyllama-1.1b"
    base["strategy"].update({"max_runs_in_flight": 5, "micro_batch": 3})
    plan = memory_plan(scenario_from_dict(base))
    iterative = memory_plan(scenario_from_dict(scenario()))
    # n1 holds no draft: the only difference is 5 runs x 3 tokens of KV cells (and the scores over them)
    extra_kv = 60 * 2 * KV * HEAD_DIM * 15 * 2
    assert plan[1].kv_cache - iterative[1].kv_cache == pytest.approx(extra_kv)


def test_hardware_fills_and_explicit_fields_override() -> None:
    s = scenario_from_dict(scenario())
    assert s.cluster.memory_bandwidth == pytest.approx(2039e9 * 0.72)
    assert s.cluster.flops == pytest.approx(312e12 * 0.23)
    assert s.network.bandwidth == pytest.approx(200e9 / 8) and s.network.latency == pytest.approx(1.1e-6)
    doc = scenario()
    doc["cluster"]["flops"] = "1T"
    doc["cluster"]["overrides"] = [{"index": 1, "hardware": "h100-sxm", "memory": "90GB"}]
    s = scenario_from_dict(doc)
    assert s.cluster.flops == 1e12
    assert s.cluster.overrides[0].memory_bandwidth == pytest.approx(3350e9 * 0.86)
    assert s.cluster.overrides[0].memory == 90e9


def test_cluster_without_figures_or_hardware_is_one_clear_error() -> None:
    doc = scenario()
    del doc["cluster"]["hardware"]
    with pytest.raises(ScenarioError, match="cluster: flops is needed, or hardware"):
        scenario_from_dict(doc)
    doc = scenario()
    doc["cluster"]["hardware"] = "h100-sxn"
    with pytest.raises(ScenarioError, match="cluster.hardware='h100-sxn': unknown hardware"):
        scenario_from_dict(doc)


def test_every_catalog_entry_is_sourced_and_sane() -> None:
    for node in NODE_TYPES.values():
        assert node.sources and all(v > 0 for v in node.peak_flops.values())
        assert 0 < node.compute_fraction <= 1 and 0 < node.bandwidth_fraction <= 1
    assert get_node_type("h200").memory == 141e9 and get_node_type("mi300x").memory_bandwidth == 5.3e12
    for preset in NETWORK_PRESETS.values():
        assert preset.source and preset.latency > 0


def test_config_json_loads_to_its_shape(tmp_path) -> None:
    config = {"model_type": "mistral", "num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
              "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 32768,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    spec = model_shape(str(path))
    assert (spec.n_layers, spec.d_model, spec.n_heads, spec.n_kv_heads, spec.d_ffn, spec.vocab_size) == \
        (32, 4096, 32, 8, 14336, 32768)
    # Mistral-7B-v0.3 has 7.248B parameters (model card)
    assert spec.n_params / 1e9 == pytest.approx(7.248, abs=0.001)
    doc = scenario()
    doc["models"]["target"] = str(tmp_path)  # a folder with config.json
    assert scenario_from_dict(doc).models.target_spec().n_layers == 32


def test_gguf_header_loads_to_its_shape(tmp_path) -> None:
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("test-moe")
    writer.add_block_count(6)
    writer.add_embedding_length(512)
    writer.add_head_count(8)
    writer.add_head_count_kv(2)
    writer.add_feed_forward_length(1024)
    writer.add_vocab_size(1000)
    writer.add_expert_count(4)
    writer.add_expert_used_count(2)
    writer.add_file_type(15)  # MOSTLY_Q4_K_M
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    spec = model_shape(str(path))
    assert (spec.n_layers, spec.d_model, spec.n_heads, spec.n_kv_heads, spec.d_ffn, spec.vocab_size) == \
        (6, 512, 8, 2, 1024, 1000)
    assert (spec.n_experts, spec.experts_per_token) == (4, 2)
    assert spec.bytes_per_weight == pytest.approx(4.85 / 8)


def test_mixtral_charges_active_parameters_and_holds_all() -> None:
    spec = get_model_spec("mixtral-8x7b")
    attention = 2 * 4096 * 4096 + 2 * 4096 * 1024
    expert = 3 * 4096 * 14336
    router = 4096 * 8
    assert spec.n_params / 1e9 == pytest.approx(46.7, abs=0.05)  # Mistral AI: 46.7B total, 12.9B active
    assert spec.n_active_params / 1e9 == pytest.approx(12.9, abs=0.05)
    node = NodeProfile("n0", flops=1e12, memory_bandwidth=1e15)  # compute-bound: time = FLOPs / FLOP/s
    cost = RooflineCostModel(spec)
    n = 16
    flops = n * (2 * (attention + 2 * expert + router) + 4 * 4096 * (0 + (n + 1) / 2))
    assert cost.layer_time(node, n, 0) == pytest.approx(flops / 1e12, rel=1e-12)
    # memory-bound single token: reads attention + 2 of 8 experts; memory holds all 8
    node = NodeProfile("n0", flops=1e18, memory_bandwidth=1e12)
    kv_read = 2 * 1024 * 1 * 2.0
    assert cost.layer_time(node, 1, 0) == pytest.approx(((attention + router + 2 * expert) * 2 + kv_read) / 1e12)
    doc = {"models": {"target": "mixtral-8x7b"}, "cluster": {"count": 1, "hardware": "h100-sxm"},
           "network": {"preset": "ib-ndr"}, "strategy": {"name": "iterative"}}
    assert memory_plan(scenario_from_dict(doc))[0].weights == pytest.approx(spec.n_params * 2)


# Published llama.cpp speeds (XiongjieDai/GPU-Benchmarks-on-LLM-Inference README, Dec 2023; tokens/s, batch 1)
PUBLISHED = [
    ("a100-80gb", "llama-2-7b", "q4_0", "tg", 136.24), ("a100-80gb", "llama-2-7b", "f16", "tg", 73.83),
    ("a100-80gb", "llama-2-70b", "q4_0", "tg", 25.68), ("a100-80gb", "llama-2-7b", "f16", "pp", 5105.77),
    ("h100-pcie", "llama-2-7b", "q4_0", "tg", 133.77), ("h100-pcie", "llama-2-7b", "f16", "tg", 83.32),
    ("h100-pcie", "llama-2-70b", "q4_0", "tg", 25.88), ("h100-pcie", "llama-2-7b", "f16", "pp", 7367.0),
]


@pytest.mark.parametrize("hardware,model,quantization,kind,published", PUBLISHED)
def test_floor_model_reproduces_published_speeds(hardware, model, quantization, kind, published) -> None:
    node_type = get_node_type(hardware)
    node = NodeProfile("n0", node_type.flops(), node_type.sustained_bandwidth())
    cost = FloorCostModel(get_model_spec(model).quantized(quantization), 2.0, {"n0": node_type.layer_floor})
    if kind == "tg":
        rate = 1.0 / cost.model_cost(node, 1, 256)
    else:
        rate = 512 / cost.model_cost(node, 512, 0)
    assert rate == pytest.approx(published, rel=0.10)


def test_floor_gives_a_gpu_step_its_shape() -> None:
    """One token, 8 tokens and 64 tokens on an H100: nearly the same time while weight reads dominate (the
    roofline), each layer never below its floor; the roofline alone is the floor's time minus layers x floor."""
    spec = get_model_spec("llama-2-7b")
    node_type = get_node_type("h100-sxm")
    node = NodeProfile("n0", node_type.flops(), node_type.sustained_bandwidth())
    floor = FloorCostModel(spec, 2.0, {"n0": 164e-6})
    roofline = RooflineCostModel(spec, 2.0)
    tiny = NodeProfile("n0", 1e18, 1e18)  # infinitely fast: only the floor is left
    assert floor.stage_cost(tiny, 32, 1, 0).total == pytest.approx(32 * 164e-6, rel=1e-4)
    for n in (1, 8, 64):
        assert floor.stage_cost(node, 32, n, 100).total - roofline.stage_cost(node, 32, n, 100).total == \
            pytest.approx(32 * 164e-6)
    weights = 32 * spec.params_per_layer * 2 / (3350e9 * 0.86)
    assert floor.stage_cost(node, 32, 8, 100).total == pytest.approx(32 * 164e-6 + weights, rel=0.01)


def test_cost_model_field_selects_floor_and_default_stays_roofline() -> None:
    from pipesim.world.costs import make_cost_model

    doc = scenario()
    s = scenario_from_dict(doc)
    assert type(make_cost_model(s.models.target_spec(), s)) is RooflineCostModel
    doc["cluster"]["cost_model"] = "floor"
    s = scenario_from_dict(doc)
    model = make_cost_model(s.models.target_spec(), s)
    assert isinstance(model, FloorCostModel) and model.floor(NodeProfile("n1", 1, 1)) == 150e-6


def test_hardware_list_and_plan_commands(capsys, tmp_path) -> None:
    assert main(["hardware", "list"]) == 0
    out = capsys.readouterr().out
    assert "h100-sxm" in out and "ib-ndr" in out and "xeon-8380-2s" in out
    path = tmp_path / "s.yaml"
    path.write_text(json.dumps(scenario()))
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "step@64 (ms)" in out and "80.0 GB" in out


def test_inline_shape_and_chain_entries() -> None:
    doc = scenario()
    doc["models"]["target"] = {"name": "mine", "n_layers": 10, "d_model": 1024, "n_heads": 16, "d_ffn": 4096,
                               "vocab_size": 5000}
    spec = scenario_from_dict(doc).models.target_spec()
    assert spec.n_kv_heads == 16 and spec.params_per_layer == 4 * 1024 * 1024 + 3 * 1024 * 4096
    doc["models"]["target"] = {"n_layers": 10, "d_model": 1024, "n_heads": 16, "d_ffn": 4096, "vocab": 5000}
    with pytest.raises(ScenarioError, match="unknown field 'vocab'"):
        scenario_from_dict(doc)
    doc = scenario(strategy__name="pipespec")
    doc["cluster"]["count"] = 3
    doc["placement"] = {}
    doc["models"]["chain"] = ["llama-3.2-1b:q4_k_m", "llama-3.1-8b"]
    specs = scenario_from_dict(doc).models.chain_specs()
    assert [s.name for s in specs] == ["llama-3.2-1b", "llama-3.1-8b", "llama-2-70b"]
    assert specs[0].bytes_per_weight == pytest.approx(4.85 / 8) and specs[1].bytes_per_weight == 2.0


def test_floor_cost_model_needs_a_floor() -> None:
    doc = scenario()
    del doc["cluster"]["hardware"]
    doc["cluster"].update({"flops": "100T", "memory_bandwidth": "1TB/s", "cost_model": "floor"})
    with pytest.raises(ScenarioError, match="cost_model=floor needs cluster.layer_floor"):
        scenario_from_dict(doc)
    doc["cluster"]["layer_floor"] = "100us"
    assert scenario_from_dict(doc).cluster.layer_floor == pytest.approx(1e-4)
