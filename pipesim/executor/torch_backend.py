"""Real compute with torch: pipeline stages with their KV caches, draft models, the reference continuation.

Only ranks in ``executor.compute: real`` import this module (emulated runs never import torch).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ..models.gguf_loader import load_gguf_weights, open_gguf, read_llama_config
from ..models.llama import LlamaConfig, LlamaStage, greedy_generate, stage_tensor_names
from ..models.tiny import make_tiny_model_weights, tiny_config
from ..models.tokenizer import GGUFTokenizer
from ..scheduling import KVOp
from ..scheduling.prefix import common_prefix_len
from .device import synchronize
from .modelref import ModelRef
from .protocol import PredictionMessage, RunMessage


def set_threads(n: int) -> None:
    """Torch threads of this rank (intra-op ``n``, inter-op 1); denormals flushed to zero (CPU speed)."""
    torch.set_num_threads(n)
    torch.set_flush_denormal(True)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (a second generation in the same process)
        pass


class ModelStore:
    """Weights, stages and tokenizers this rank has loaded, kept across the generations of one job.

    A GGUF file is opened once (its reader parses the whole header, seconds for a large vocabulary); a stage
    dequantizes only its own tensors unless the whole model was loaded already. Weights are read on the host
    and each stage is moved to ``device`` (a torch device: the CPU, or the GPU of this rank).
    """

    def __init__(self, device: Any = "cpu") -> None:
        self.device = torch.device(device)
        self._readers: dict[str, Any] = {}
        self._configs: dict[str, LlamaConfig] = {}
        self._weights: dict[tuple, dict[str, torch.Tensor]] = {}
        self._stages: dict[tuple, LlamaStage] = {}
        self._tokenizers: dict[str, GGUFTokenizer] = {}

    def _reader(self, ref: ModelRef) -> Any:
        key = str(ref.path)
        if key not in self._readers:
            self._readers[key] = open_gguf(ref.path)
            self._configs[key] = read_llama_config(self._readers[key])
        return self._readers[key]

    def config(self, ref: ModelRef) -> LlamaConfig:
        if ref.kind == "tiny":
            return tiny_config(ref.spec_name)
        self._reader(ref)
        return self._configs[str(ref.path)]

    def _all_weights(self, ref: ModelRef) -> dict[str, torch.Tensor]:
        key = ref.weights_key
        if key not in self._weights:
            if ref.kind == "tiny":
                self._weights[key] = make_tiny_model_weights(ref.spec_name, seed=ref.seed)
            else:
                self._weights[key] = load_gguf_weights(self._reader(ref))
        return self._weights[key]

    def stage(self, ref: ModelRef, layer_start: int, layer_end: int, has_embedding: bool,
              has_output_head: bool) -> LlamaStage:
        """A stage of ``ref`` (layers ``[layer_start, layer_end)``, embedding and/or output head); the output head
        of a truncated early-exit draft goes through its exit adapter."""
        key = (ref.key, layer_start, layer_end, has_embedding, has_output_head)
        if key not in self._stages:
            config = self.config(ref)
            if ref.kind == "tiny" or ref.weights_key in self._weights:
                weights = self._all_weights(ref)
            else:
                names = stage_tensor_names(config, layer_start, layer_end, has_embedding, has_output_head)
                weights = load_gguf_weights(self._reader(ref), names)
            stage = LlamaStage.from_weights(config, weights, layer_start, layer_end, has_embedding, has_output_head)
            if ref.adapter is not None and has_output_head:
                stage.set_exit_adapter(load_draft_adapter(ref, stage))
            self._stages[key] = stage.to(self.device)
        return self._stages[key]

    def full_model(self, ref: ModelRef) -> LlamaStage:
        """The whole model (embedding, all layers, head; a truncated draft: its layers), loading all its weights
        (a truncated draft only the tensors it holds)."""
        if ref.exit_layers is None:
            self._all_weights(ref)
        return self.stage(ref, 0, ref.n_layers, True, True)

    def tokenizer(self, ref: ModelRef) -> GGUFTokenizer | None:
        if ref.kind != "gguf" or not ref.has_tokenizer:
            return None
        key = str(ref.path)
        if key not in self._tokenizers:
            self._tokenizers[key] = GGUFTokenizer.from_gguf(self._reader(ref))
        return self._tokenizers[key]


def apply_kv_op(kv: Any, op: KVOp) -> None:
    if op.kind == "cp":
        kv.seq_cp(op.seq, op.dst, op.p0, op.p1)
    elif op.kind == "rm":
        kv.seq_rm(op.seq, op.p0, op.p1)
    else:
        kv.seq_keep(op.seq)


class EarlyExitHead:
    """SPEED's real early exit: the model's final norm and output head (optionally through a trained
    ``ExitAdapter``) applied to the hidden state after the exit layer; the prediction is its argmax."""

    def __init__(self, head: LlamaStage, adapter: Any = None) -> None:
        self.head = head  # a stage holding the output head (the last stage, or a head-only stage)
        self.adapter = adapter

    def predict(self, hidden: torch.Tensor) -> int:
        """The early prediction from the hidden state [d_model] of the run's last token."""
        hidden = hidden.reshape(1, -1).to(torch.float32)
        with torch.inference_mode():
            if self.adapter is not None:
                from ..models.early_exit import early_exit_logits

                logits = early_exit_logits(self.head, hidden, self.adapter)
            else:
                weight = self.head.output.weight if self.head.output is not None else self.head.token_embd.weight
                logits = self.head.output_norm(hidden) @ weight.T
        return int(torch.argmax(logits[0]))


def load_exit_adapter(spec: str, exit_layer: int, head: LlamaStage, model_text: str) -> Any:
    """An ``ExitAdapter`` for ``exit_layer`` (0-based: the hidden state after that layer, which the adapter
    module counts as ``exit_layer + 1`` layers): a file path, or 'shipped' for the one pipesim ships."""
    from ..models.early_exit import ExitAdapter, shipped_adapter_path

    layers = exit_layer + 1
    if spec == "shipped":
        name = "smollm2" if "smollm2" in model_text.lower() else model_text
        path = shipped_adapter_path(layers, name)
    else:
        path = spec
    adapter = ExitAdapter.load(path, head, layers).to(head.inv_freq.device)
    adapter.eval()
    adapter.requires_grad_(False)
    return adapter


def load_draft_adapter(ref: ModelRef, stage: LlamaStage) -> Any:
    """The exit adapter of a truncated early-exit draft, checked against its model (head fingerprint, layers)."""
    from ..models.early_exit import ExitAdapter

    adapter = ExitAdapter.load(ref.adapter, stage, ref.exit_layers)
    adapter.eval()
    adapter.requires_grad_(False)
    return adapter


class TorchStage:
    """A pipeline stage computing real layers, with its own KV cache."""

    def __init__(self, stage: LlamaStage, capacity: int, max_seqs: int, return_mode: str, top_k: int,
                 early_exit: EarlyExitHead | None = None) -> None:
        self.stage = stage
        self.kv = stage.make_kv_cache(capacity, max_seqs)
        self.max_seqs = max_seqs
        self.return_mode = return_mode
        self.top_k = top_k
        self.early_exit = early_exit  # None: the head's oracle decides early predictions
        self.max_cells = 0

    def kv_cells(self) -> int:
        return self.kv.used_cells()

    def apply_kv_ops(self, ops: Sequence[KVOp]) -> None:
        for op in ops:
            apply_kv_op(self.kv, op)
        if ops:
            synchronize(self.kv.k.device)

    def _exit_hook(self, msg: RunMessage, on_exit: Callable[[int, float], None] | None):
        stage = self.stage
        if on_exit is None or msg.exit_layer is None or not stage.layer_start <= msg.exit_layer < stage.layer_end:
            return None
        exit_layer, early = msg.exit_layer, self.early_exit

        def after_layer(layer: int, hidden: torch.Tensor) -> None:
            if layer != exit_layer:
                return
            start = time.perf_counter()
            token = early.predict(hidden[-1]) if early is not None else -1
            on_exit(token, time.perf_counter() - start)

        return after_layer

    def forward(self, msg: RunMessage, activations: np.ndarray | None,
                should_cancel: Callable[[], bool] | None = None,
                on_exit: Callable[[int, float], None] | None = None) -> np.ndarray | PredictionMessage | None:
        """Run the stage; None when cancelled between layers, else activations or predictions."""
        n = msg.n_tokens
        if self.stage.has_embedding:
            inputs = torch.tensor(msg.tokens, dtype=torch.int64)
        else:
            inputs = torch.from_numpy(activations).view(n, self.stage.config.d_model)
        token_seqs = torch.zeros((n, self.max_seqs), dtype=torch.bool)
        token_seqs[:, list(msg.seq_ids)] = True
        out = self.stage(inputs, torch.tensor(msg.positions, dtype=torch.int64), token_seqs, self.kv, should_cancel,
                         after_layer=self._exit_hook(msg, on_exit),
                         output_from=msg.output_from if self.stage.has_output_head else 0)
        self.max_cells = max(self.max_cells, self.kv.used_cells())
        if out is None:
            return None
        out = out.cpu()  # host buffers for MPI; the copy waits for the device, so the compute's end is real
        if not self.stage.has_output_head:
            return np.ascontiguousarray(out.numpy(), dtype=np.float32)
        logits = out  # the stage computed the output head for the returned tokens only
        n_out, vocab = logits.shape
        if self.return_mode == "logits":
            return PredictionMessage(msg.run_id, "logits", n_out, vocab, None, logits.numpy())
        if self.return_mode == "topk":
            k = min(self.top_k, vocab)
            values, ids = torch.topk(logits, k, dim=1)
            return PredictionMessage(msg.run_id, "topk", n_out, k, ids.numpy(), values.numpy())
        return PredictionMessage(msg.run_id, "ids", n_out, 1, logits.argmax(dim=1).numpy(), None)


class ModelRunner:
    """A whole model run one draft step at a time, with its own KV cache (rolled back on rewind)."""

    def __init__(self, model: LlamaStage, capacity: int) -> None:
        self.model = model
        self.kv = model.make_kv_cache(capacity, 1)
        self.vocab_size = model.config.vocab_size
        self.cached: list[int] = []
        self._seq = torch.ones((1, 1), dtype=torch.bool)

    def rewind(self, context: Sequence[int]) -> list[int]:
        keep = min(common_prefix_len(self.cached, list(context)), len(context) - 1)
        if keep < len(self.cached):
            self.kv.seq_rm(0, keep)
            del self.cached[keep:]
        return list(context[keep:])

    def feed(self, tokens: Sequence[int]) -> tuple[int, float]:
        start = len(self.cached)
        ids = torch.tensor([t % self.vocab_size for t in tokens], dtype=torch.int64)
        positions = torch.arange(start, start + len(tokens), dtype=torch.int64)
        logits = self.model(ids, positions, self._seq.expand(len(tokens), 1), self.kv, output_from=len(tokens) - 1)
        self.cached.extend(tokens)
        probs = torch.softmax(logits[-1], dim=0)
        best = int(torch.argmax(probs))
        return best, float(probs[best])


def reference_continuation(model: LlamaStage, prompt: Sequence[int], n_tokens: int,
                           eos_id: int | None = None) -> list[int]:
    """Target-only greedy continuation of ``prompt`` on the whole model (untimed; the oracle's truth)."""
    return greedy_generate(model, list(prompt), n_tokens, eos_id=eos_id)
