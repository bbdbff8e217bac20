"""Device memory readings for telemetry (PyTorch's allocator view; None off CUDA)."""

from __future__ import annotations

import torch


def cuda_memory(device: torch.device) -> dict[str, int] | None:
    """Allocated/reserved now and their peaks, in bytes; None when the device is not a GPU."""
    if device.type != "cuda":
        return None
    return {
        "allocated": torch.cuda.memory_allocated(device),
        "reserved": torch.cuda.memory_reserved(device),
        "peak_allocated": torch.cuda.max_memory_allocated(device),
        "peak_reserved": torch.cuda.max_memory_reserved(device),
    }


def cuda_peaks(device: torch.device) -> dict[str, int] | None:
    mem = cuda_memory(device)
    return None if mem is None else {"allocated": mem["peak_allocated"], "reserved": mem["peak_reserved"]}
