"""Device choice, one rule for every stage: ``auto`` is CUDA when present, else CPU."""

from __future__ import annotations

import functools
import platform
from pathlib import Path
from typing import Any

import torch

from fedct.errors import FedctError


def pick_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` if available else ``cpu``; otherwise the named device.

    Naming ``cuda`` on a machine without one is an error, not a silent CPU run.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise FedctError(f"device {name!r}: not a torch device ({exc})") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FedctError(f"device {name!r}: CUDA is not available on this machine")
    return device


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX tiles or AVX512-BF16).

    There, oneDNN runs bf16 convolutions about 2x faster than fp32 (training step and
    batched MC dropout of the demo network, ``benchmarks/cpu_bf16.py``); elsewhere bf16 is
    emulated and slower, so autocast stays off.
    """
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    try:
        return any(bool(getattr(torch.cpu, p, lambda: False)()) for p in probes)
    except RuntimeError:  # a torch build without the CPU capability probes
        return False


def use_amp(device: torch.device, amp: bool = True) -> bool:
    """bf16 autocast on ``device``: with ``amp``, on CUDA, and on a CPU with native bf16."""
    if not amp:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and cpu_has_bf16()


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def runtime(device: torch.device, amp: bool = True) -> dict[str, Any]:
    """Where a result was computed, for a model card and its MLflow run.

    Float rounding, and so a model's weights, depends on it: a CPU result repeats for one
    CPU kind and thread count (``train.workers`` sets the threads of each training), a GPU
    one for one card and build. Nothing here identifies a patient or a host.
    """
    info: dict[str, Any] = {"device": str(device), "torch": torch.__version__,
                            "bf16_autocast": use_amp(device, amp)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["cpu"] = cpu_model()
        info["threads"] = torch.get_num_threads()
    return info
