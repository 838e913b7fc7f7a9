"""Executor settings of a scenario (pure pydantic: importing this must not import torch or mpi4py)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from .strict import StrictModel


class ExecutorConfig(StrictModel):
    """How the reference executor runs a scenario on real processes."""

    model: str = Field("tiny-llama", description="target: 'tiny-llama' (random weights, 'tiny-llama@SEED' for "
                                                 "another seed), 'smollm2' (fetched GGUF), or a .gguf path")
    draft: Literal["oracle", "model"] = Field(
        "oracle", description="oracle draft with acceptance.alpha (pipespec: each level right with its "
                              "chain_alphas accuracy), or a model (pipespec: executor.chain_models)")
    draft_model: str | None = Field(None, description="draft model for draft=model, or the model whose real compute "
                                                      "stands in for the oracle's cost (oracle_cost=model); "
                                                      "MODEL-exitK: the first K layers of MODEL with its shipped "
                                                      "exit adapter and its head (e.g. smollm2-exit10)")
    oracle_cost: Literal["emulated", "model", "none"] = Field(
        "emulated", description="oracle draft cost: sleep for the roofline of models.draft, run draft_model, or free")
    compute: Literal["real", "emulated"] = Field("real", description="real torch compute, or sleep for modelled cost")
    link_emulation: bool = Field(False, description="delay each message by latency + bytes/bandwidth of the scenario")
    prompt: str | None = Field(None, description="prompt text (real models); default: synthetic prompt tokens")
    chat: bool = Field(False, description="wrap the prompt in the model's chat template (GGUF models)")
    stop_at_eos: bool = Field(False, description="stop generating at the model's end-of-sequence token (for "
                                                  "SmolLM2 <|im_end|>, the end of the turn); default: true "
                                                  "when chat is set, else false")
    threads_per_rank: int = Field(1, ge=1, description="torch threads per rank")
    device: Literal["cpu", "cuda", "auto"] = Field(
        "cpu", description="where real compute runs: cpu, cuda (rank r on GPU r mod the GPUs of its host; several "
                           "ranks may share one), or auto (cuda when torch sees one); messages pass through host "
                           "buffers either way")
    pin_ranks: bool = Field(False, description="bind each rank to its own threads_per_rank cores of its allowed CPU "
                                               "set (by its rank on the host, round robin), so ranks do not migrate "
                                               "or share a core")
    kv_headroom: int = Field(512, ge=0, description="KV cells per stage beyond prompt + generated tokens")
    poll_interval_s: float = Field(0.0005, gt=0, le=0.01, description="longest sleep of a waiting rank")
    timeout_s: float = Field(300.0, gt=0, description="bound on each generation of a job (set-up, run, drain); "
                                                      "every wait is bounded by it")
    fault_rank: int | None = Field(None, ge=0, description="testing: this rank raises when its first run arrives")
    fault_action: Literal["raise", "kill", "stop"] = Field(
        "raise", description="testing: what executor.fault_rank does at its first run: raise an error, or send "
                             "itself SIGKILL (dies without a word) or SIGSTOP (stops answering)")
    kv_transactions: Literal["messages", "charge"] = Field(
        "messages", description="pipeinfer, strategy.kv_transactions=reference: send each relayed KV transaction as "
                                "its own message, forwarded and applied by every stage as the reference code does "
                                "('messages'), or only count them in the run's header and sleep "
                                "cluster.kv_transaction_time (or the profile's kv_transaction) per transaction at "
                                "every stage, as the simulator charges them ('charge')")
    seed: int = Field(0, description="seed of random tiny-model weights (a tiny draft model uses seed + 1)")
    early_exit: Literal["real", "oracle"] | None = Field(
        None, description="speed: the early prediction from the model's own final norm + head applied after the "
                          "exit layer (real), or the reference token with probability acceptance.alpha (oracle); "
                          "default: real for GGUF models, oracle for tiny models and emulated compute")
    exit_adapter: str | None = Field(
        None, description="speed, early_exit=real: a trained ExitAdapter file, or 'shipped' for the one that "
                          "ships for the exit layer (pipesim/data/exit_adapters); default: the plain early exit")
    chain_models: list[str] | None = Field(
        None, description="pipespec, real compute: weights of the draft models of models.chain, smallest first "
                          "(e.g. [tiny-llama@1, tiny-llama@2]); executor.model is the target")

    @model_validator(mode="before")
    @classmethod
    def _stop_at_end_of_turn(cls, data: Any) -> Any:
        """A chat prompt stops at the end of its turn unless ``stop_at_eos`` says otherwise."""
        if isinstance(data, dict) and data.get("stop_at_eos") is None and data.get("chat"):
            data = {**data, "stop_at_eos": True}
        return data
