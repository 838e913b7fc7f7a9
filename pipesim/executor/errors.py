"""Errors of the executor."""

from __future__ import annotations


class ExecutorSetupError(ValueError):
    """A scenario the executor cannot run as asked (one line naming the field and the value)."""


class ExecutorTimeout(RuntimeError):
    """A bounded wait ran out of time (``executor.timeout_s``)."""


class InjectedFault(RuntimeError):
    """The failure ``executor.fault_rank`` asks for (to test that a failing rank ends the whole job)."""
