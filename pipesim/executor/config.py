"""Executor settings of a scenario (pure pydantic: importing this must not import torch or mpi4py)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ExecutorConfig(BaseModel):
    """How the reference executor runs a scenario on real processes."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model: str = Field("tiny-llama", description="target: 'tiny-llama' (random weights), 'smollm2', or a .gguf path")
    draft: Literal["oracle", "model"] = Field("oracle", description="oracle draft with acceptance.alpha, or a model")
    draft_model: str | None = Field(None, description="draft model for draft=model (same forms as model)")
    compute: Literal["real", "emulated"] = Field("real", description="real torch compute, or sleep for modelled cost")
    link_emulation: bool = Field(False, description="delay each message by latency + bytes/bandwidth of the scenario")
    prompt: str | None = Field(None, description="prompt text (real models); default: synthetic prompt tokens")
    threads_per_rank: int = Field(1, ge=1, description="torch threads per rank")
    timeout_s: float = Field(300.0, gt=0, description="bound on the whole job; every wait is bounded by it")
    seed: int = 0
