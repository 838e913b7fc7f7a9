"""Where a rank's real compute runs: ``executor.device`` (cpu, cuda, auto) resolved to a torch device.

Messages between ranks always pass through host (numpy) buffers, so a stage copies its inputs to the device and
its outputs back; the copy back waits for the device, and ``synchronize`` makes any other timed section (KV
operations, a draft step) end when the device has finished, not when its work was queued. Several ranks may share
one GPU: rank ``r`` of a host with ``g`` visible GPUs uses GPU ``r mod g``. Imports torch only when called.
"""

from __future__ import annotations

from typing import Any

DEVICE_SETTINGS = ("cpu", "cuda", "auto")


class DeviceUnavailableError(RuntimeError):
    """``executor.device=cuda`` on a rank whose torch sees no CUDA device."""


def resolve_device(setting: str, local_rank: int = 0) -> Any:
    """The torch device of a rank: ``cpu``; ``cuda`` (GPU ``local_rank mod count``, an error when torch has no
    CUDA device); ``auto`` (cuda when available, else cpu)."""
    import torch

    if setting not in DEVICE_SETTINGS:
        raise ValueError(f"executor.device={setting!r}: must be one of {', '.join(DEVICE_SETTINGS)}")
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceUnavailableError(
            f"executor.device=cuda but torch {torch.__version__} sees no CUDA device "
            "(torch.cuda.is_available() is False); use executor.device=cpu or auto")
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def synchronize(device: Any) -> None:
    """Wait until ``device`` has finished the work queued on it (nothing to wait for on the CPU)."""
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        torch.cuda.synchronize(device)
