"""Catalogs of node types (GPUs, CPU nodes) and interconnects, with the figures a scenario may take from them.

``cluster.hardware: h100-sxm`` fills a node's effective FLOP/s (peak of ``cluster.compute_dtype`` x the
sustained compute fraction), effective memory bandwidth (peak x the sustained bandwidth fraction), memory
capacity and the per-layer time floor of the ``floor`` cost model; ``network.preset: ib-ndr`` fills a link's
bandwidth and latency. Explicit scenario fields override what a catalog entry gives.

Peak figures are the vendors' datasheet numbers (dense, i.e. without structured sparsity). Sustained fractions
and floors say what an inference engine of the llama.cpp kind (the one PipeInfer is built on) reaches; where
they are fitted to published measurements the comment says which, otherwise they are stated assumptions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

T = 1e12
G = 1e9
GB = 1e9
GiB = 1024.0 ** 3


@dataclass(frozen=True)
class NodeType:
    """A node type: peak FLOP/s by dtype, memory bandwidth and capacity, and sustained fractions."""

    name: str
    kind: str  # "gpu" or "cpu"
    description: str
    peak_flops: dict[str, float]  # dtype -> dense FLOP/s (or OP/s for int8)
    memory_bandwidth: float  # peak B/s
    memory: float  # capacity in bytes (GPU memory; for CPU nodes the installed RAM of the class)
    compute_fraction: float  # sustained share of the peak FLOP/s
    bandwidth_fraction: float  # sustained share of the peak memory bandwidth
    layer_floor: float  # seconds: least time of one transformer layer however small the run (kernel launches)
    sources: tuple[str, ...] = field(default_factory=tuple)

    @property
    def default_dtype(self) -> str:
        """fp16 where the node has a figure for it (GPUs), else fp32 (CPU nodes: llama.cpp computes in fp32)."""
        return "fp16" if "fp16" in self.peak_flops else "fp32"

    def flops(self, dtype: str | None = None) -> float:
        """Sustained FLOP/s for ``dtype`` (default: ``default_dtype``), i.e. peak x compute_fraction."""
        key = (dtype or self.default_dtype).lower()
        if key not in self.peak_flops:
            known = ", ".join(sorted(self.peak_flops))
            raise ValueError(f"{self.name} has no figure for dtype {dtype!r} (known: {known})")
        return self.peak_flops[key] * self.compute_fraction

    def sustained_bandwidth(self) -> float:
        return self.memory_bandwidth * self.bandwidth_fraction


@dataclass(frozen=True)
class NetworkPreset:
    """An interconnect: per-direction bandwidth (B/s) and one-way small-message latency (s)."""

    name: str
    description: str
    bandwidth: float
    latency: float
    source: str


# -- sustained fractions and floors (GPUs) ----------------------------------------------------------------------
# Fitted to llama.cpp's published single-stream speeds on one GPU (XiongjieDai/GPU-Benchmarks-on-LLM-Inference,
# README "Average eval speed" and "Average prompt eval speed", Llama-2 7B q4_0/f16 and 70B q4_0, CUDA build of
# Dec 2023): time per token = layers x floor + bytes read / (peak bandwidth x fraction) gives, least squares over
# the three eval speeds, a floor of 150 us (A100 80GB) / 164 us (H100 PCIe) per layer and bandwidth fractions of
# 0.72 / 0.86; prompt eval of 7B f16 (5106 / 7367 tokens/s) less the floor gives compute fractions of 0.23 / 0.14
# of the fp16 tensor peak. GPUs without published figures in that table take 150 us and 0.8 (between the two
# fits) and a compute fraction of 0.18 (their mean): stated assumptions, to be calibrated.
_FLOOR_FIT = "floor and fractions fitted to XiongjieDai/GPU-Benchmarks-on-LLM-Inference (llama.cpp, Dec 2023)"
_FLOOR_ASSUMED = "floor 150 us, fractions 0.8 / 0.18 assumed from the A100/H100 PCIe fits (not measured)"

# -- CPU nodes -------------------------------------------------------------------------------------------------
# Peak FP32 = sockets x cores x base clock x FP32 FLOP/cycle per core (two FMA units of the SIMD width; vendor
# product pages). Peak memory bandwidth = sockets x channels x MT/s x 8 bytes. Sustained fractions: STREAM Triad
# on dual-socket servers reaches about 75-80% of peak (McCalpin's STREAM results), but llama.cpp's threads span
# both NUMA sockets without placing weights per socket, so about half the aggregate peak is assumed (0.5).
# llama.cpp's CPU matmuls on quantized weights reach a small share of the FP32 peak: 0.3 assumed. A CPU
# "layer floor" is thread synchronisation between the layer's ops, about 20 us assumed (ggml's barrier per op
# x ~15 ops). Capacities are those of a typical configuration of the class (one DIMM per channel).

NODE_TYPES: dict[str, NodeType] = {n.name: n for n in [
    NodeType(
        "a100-40gb", "gpu", "NVIDIA A100 SXM4 40GB",
        # NVIDIA A100 Tensor Core GPU datasheet (2021): FP16/BF16 tensor 312 TF, TF32 156 TF, FP32 19.5 TF,
        # INT8 624 TOPS (dense); HBM2 1,555 GB/s; 40 GB.
        {"fp16": 312 * T, "bf16": 312 * T, "tf32": 156 * T, "fp32": 19.5 * T, "int8": 624 * T},
        1555 * GB, 40 * GB, 0.23, 0.72, 150e-6,
        ("NVIDIA A100 datasheet", "fractions/floor: the A100 80GB fit " + _FLOOR_FIT)),
    NodeType(
        "a100-80gb", "gpu", "NVIDIA A100 SXM4 80GB",
        # NVIDIA A100 datasheet: same tensor peaks as 40GB; HBM2e 2,039 GB/s (SXM); 80 GB.
        {"fp16": 312 * T, "bf16": 312 * T, "tf32": 156 * T, "fp32": 19.5 * T, "int8": 624 * T},
        2039 * GB, 80 * GB, 0.23, 0.72, 150e-6,
        ("NVIDIA A100 datasheet", _FLOOR_FIT)),
    NodeType(
        "h100-sxm", "gpu", "NVIDIA H100 SXM5 80GB",
        # NVIDIA H100 Tensor Core GPU datasheet: FP16/BF16 tensor 989.4 TF, FP8 1,979 TF, TF32 494.7 TF,
        # FP32 67 TF, INT8 1,979 TOPS (dense; the datasheet's headline figures are with sparsity, 2x);
        # HBM3 3.35 TB/s; 80 GB.
        {"fp16": 989.4 * T, "bf16": 989.4 * T, "fp8": 1979 * T, "tf32": 494.7 * T, "fp32": 67 * T,
         "int8": 1979 * T},
        3350 * GB, 80 * GB, 0.14, 0.86, 164e-6,
        ("NVIDIA H100 datasheet", "fractions/floor: the H100 PCIe fit " + _FLOOR_FIT)),
    NodeType(
        "h100-pcie", "gpu", "NVIDIA H100 PCIe 80GB",
        # NVIDIA H100 datasheet (PCIe): FP16/BF16 tensor 756 TF, FP8 1,513 TF, TF32 378 TF, FP32 51 TF,
        # INT8 1,513 TOPS (dense); HBM2e 2.0 TB/s; 80 GB.
        {"fp16": 756 * T, "bf16": 756 * T, "fp8": 1513 * T, "tf32": 378 * T, "fp32": 51 * T, "int8": 1513 * T},
        2000 * GB, 80 * GB, 0.14, 0.86, 164e-6,
        ("NVIDIA H100 datasheet", _FLOOR_FIT)),
    NodeType(
        "h200", "gpu", "NVIDIA H200 SXM 141GB",
        # NVIDIA H200 Tensor Core GPU datasheet: compute as H100 SXM (FP16 989.4 TF dense, FP8 1,979 TF,
        # FP32 67 TF); HBM3e 4.8 TB/s; 141 GB.
        {"fp16": 989.4 * T, "bf16": 989.4 * T, "fp8": 1979 * T, "tf32": 494.7 * T, "fp32": 67 * T,
         "int8": 1979 * T},
        4800 * GB, 141 * GB, 0.14, 0.86, 164e-6,
        ("NVIDIA H200 datasheet", "fractions/floor: the H100 PCIe fit " + _FLOOR_FIT)),
    NodeType(
        "l40s", "gpu", "NVIDIA L40S 48GB",
        # NVIDIA L40S datasheet: FP16/BF16 tensor 362.05 TF, FP8 733 TF, TF32 183 TF, FP32 91.6 TF,
        # INT8 733 TOPS (dense); GDDR6 864 GB/s; 48 GB.
        {"fp16": 362.05 * T, "bf16": 362.05 * T, "fp8": 733 * T, "tf32": 183 * T, "fp32": 91.6 * T,
         "int8": 733 * T},
        864 * GB, 48 * GB, 0.18, 0.8, 150e-6,
        ("NVIDIA L40S datasheet", _FLOOR_ASSUMED)),
    NodeType(
        "mi250x", "gpu", "AMD Instinct MI250X (one OAM module, both GCDs)",
        # AMD Instinct MI250X data sheet: FP16/BF16 matrix 383 TF, FP32 matrix 95.7 TF, FP32 vector 47.9 TF,
        # INT8 383 TOPS; HBM2e 3.2 TB/s; 128 GB (two GCDs of 64 GB / 1.6 TB/s each).
        {"fp16": 383 * T, "bf16": 383 * T, "fp32": 95.7 * T, "int8": 383 * T},
        3200 * GB, 128 * GB, 0.18, 0.8, 150e-6,
        ("AMD Instinct MI250X data sheet", _FLOOR_ASSUMED)),
    NodeType(
        "mi250x-gcd", "gpu", "AMD Instinct MI250X, one GCD (what a rank sees, e.g. on Frontier)",
        # Half of the MI250X module's figures (AMD data sheet; OLCF Frontier user guide: 8 GCDs per node,
        # 64 GB HBM2e each).
        {"fp16": 191.5 * T, "bf16": 191.5 * T, "fp32": 47.85 * T, "int8": 191.5 * T},
        1600 * GB, 64 * GB, 0.18, 0.8, 150e-6,
        ("AMD Instinct MI250X data sheet", "OLCF Frontier user guide", _FLOOR_ASSUMED)),
    NodeType(
        "mi300x", "gpu", "AMD Instinct MI300X 192GB",
        # AMD Instinct MI300X data sheet: FP16/BF16 matrix 1,307.4 TF, FP8 2,614.9 TF, FP32 matrix 163.4 TF,
        # INT8 2,614.9 TOPS (dense); HBM3 5.3 TB/s; 192 GB.
        {"fp16": 1307.4 * T, "bf16": 1307.4 * T, "fp8": 2614.9 * T, "fp32": 163.4 * T, "int8": 2614.9 * T},
        5300 * GB, 192 * GB, 0.18, 0.8, 150e-6,
        ("AMD Instinct MI300X data sheet", _FLOOR_ASSUMED)),
    NodeType(
        "xeon-e5-2690v4-2s", "cpu", "dual Xeon E5-2690 v4 (Broadwell, 2x14 cores), 256 GB DDR4-2400",
        # Intel ARK: 14 cores, 2.6 GHz base, AVX2 with 2 FMA units -> 32 FP32 FLOP/cycle/core:
        # 2 x 14 x 2.6e9 x 32 = 2.33 TF; 4 channels DDR4-2400 per socket -> 2 x 4 x 2400e6 x 8 = 153.6 GB/s.
        {"fp32": 2.33 * T},
        153.6 * GB, 256 * GB, 0.3, 0.5, 20e-6,
        ("Intel ARK E5-2690 v4", "CPU fractions assumed (see module comment)")),
    NodeType(
        "xeon-8380-2s", "cpu", "dual Xeon Platinum 8380 (Ice Lake, 2x40 cores), 512 GB DDR4-3200",
        # Intel ARK: 40 cores, 2.3 GHz base, AVX-512 with 2 FMA units -> 64 FP32 FLOP/cycle/core:
        # 2 x 40 x 2.3e9 x 64 = 11.8 TF; 8 channels DDR4-3200 per socket -> 409.6 GB/s.
        {"fp32": 11.8 * T},
        409.6 * GB, 512 * GB, 0.3, 0.5, 20e-6,
        ("Intel ARK Xeon Platinum 8380", "CPU fractions assumed (see module comment)")),
    NodeType(
        "epyc-7763-2s", "cpu", "dual EPYC 7763 (Milan, 2x64 cores), 512 GB DDR4-3200",
        # AMD product page: 64 cores, 2.45 GHz base, AVX2 with 2 FMA units -> 32 FP32 FLOP/cycle/core:
        # 2 x 64 x 2.45e9 x 32 = 10.0 TF; 8 channels DDR4-3200 per socket -> 409.6 GB/s.
        {"fp32": 10.0 * T},
        409.6 * GB, 512 * GB, 0.3, 0.5, 20e-6,
        ("AMD EPYC 7763 product page", "CPU fractions assumed (see module comment)")),
    NodeType(
        "epyc-9654-2s", "cpu", "dual EPYC 9654 (Genoa, 2x96 cores), 768 GB DDR5-4800",
        # AMD product page: 96 cores, 2.4 GHz base, AVX-512 on 2 x 256-bit FMA -> 32 FP32 FLOP/cycle/core:
        # 2 x 96 x 2.4e9 x 32 = 14.7 TF; 12 channels DDR5-4800 per socket -> 2 x 12 x 4800e6 x 8 = 921.6 GB/s.
        {"fp32": 14.7 * T},
        921.6 * GB, 768 * GB, 0.3, 0.5, 20e-6,
        ("AMD EPYC 9654 product page", "CPU fractions assumed (see module comment)")),
]}

# Bandwidth: the line rate per direction. Latency: one-way small-message latency as MPI sees it.
NETWORK_PRESETS: dict[str, NetworkPreset] = {p.name: p for p in [
    NetworkPreset("1gbe", "Gigabit Ethernet, TCP", 1e9 / 8, 50e-6,
                  "IEEE 802.3ab line rate; ~50 us MPI ping-pong half round trip over kernel TCP (OSU osu_latency "
                  "on GbE, typical)"),
    NetworkPreset("10gbe", "10 Gigabit Ethernet, TCP", 10e9 / 8, 15e-6,
                  "IEEE 802.3ae line rate; ~15 us MPI latency over kernel TCP (OSU osu_latency on 10GbE, typical)"),
    NetworkPreset("25gbe", "25 Gigabit Ethernet, TCP", 25e9 / 8, 10e-6,
                  "IEEE 802.3by line rate; ~10 us MPI latency over kernel TCP (typical)"),
    NetworkPreset("100gbe", "100 Gigabit Ethernet, RoCE v2", 100e9 / 8, 3e-6,
                  "IEEE 802.3ba line rate; ~3 us with RoCE v2 on ConnectX NICs (NVIDIA RoCE performance notes)"),
    NetworkPreset("ib-hdr", "InfiniBand HDR (200 Gb/s)", 200e9 / 8, 1.1e-6,
                  "NVIDIA ConnectX-6 HDR: 200 Gb/s; ~1.1 us osu_latency (MVAPICH/OSU published results)"),
    NetworkPreset("ib-ndr", "InfiniBand NDR (400 Gb/s)", 400e9 / 8, 1.0e-6,
                  "NVIDIA ConnectX-7 NDR: 400 Gb/s; ~1 us MPI latency (NVIDIA Quantum-2 product brief)"),
    NetworkPreset("nvlink4", "NVLink 4 (H100), GPU to GPU", 450e9, 2e-6,
                  "NVIDIA H100 datasheet: 900 GB/s total NVLink (450 GB/s per direction); ~2 us small-message "
                  "latency through NCCL/CUDA IPC (typical)"),
    NetworkPreset("nvlink3", "NVLink 3 (A100), GPU to GPU", 300e9, 2e-6,
                  "NVIDIA A100 datasheet: 600 GB/s total NVLink (300 GB/s per direction); ~2 us (typical)"),
    NetworkPreset("pcie4", "PCIe 4.0 x16", 32e9, 5e-6,
                  "PCI-SIG PCIe 4.0: 16 GT/s x 16 lanes, 128b/130b -> 31.5 GB/s per direction; ~5 us for a "
                  "small cudaMemcpy through host (typical)"),
    NetworkPreset("pcie5", "PCIe 5.0 x16", 64e9, 5e-6,
                  "PCI-SIG PCIe 5.0: 32 GT/s x 16 lanes -> 63 GB/s per direction; ~5 us (typical)"),
]}


def get_node_type(name: str) -> NodeType:
    """A node type by name; the error lists the known names."""
    try:
        return NODE_TYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown hardware {name!r} (known: {', '.join(NODE_TYPES)})") from None


def get_network_preset(name: str) -> NetworkPreset:
    """A network preset by name; the error lists the known names."""
    try:
        return NETWORK_PRESETS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown network preset {name!r} (known: {', '.join(NETWORK_PRESETS)})") from None
