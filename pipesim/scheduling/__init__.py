"""The scheduling logic shared by the simulator and the executor (pure Python: no simpy, mpi4py or torch)."""

from .actions import Action, CancelRuns, EmitTokens, Finish, InvalidateRuns, LaunchRun, RequestDraft
from .kv_pool import KVPartitionPool
from .runs import CANONICAL_SEQ, KVOp, Run
from .strategies import STRATEGIES, Strategy, make_strategies, make_strategy
from .verification import TokenTree, TreeVerification, Verification, verify_linear, verify_tree

__all__ = [
    "Action", "CancelRuns", "EmitTokens", "Finish", "InvalidateRuns", "LaunchRun", "RequestDraft",
    "KVPartitionPool", "CANONICAL_SEQ", "KVOp", "Run", "STRATEGIES", "Strategy", "make_strategy", "make_strategies",
    "TokenTree", "TreeVerification", "Verification", "verify_linear", "verify_tree",
]
