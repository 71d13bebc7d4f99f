"""Where a trial runs and its speed settings: bf16 autocast and cudnn autotuning on CUDA (bf16 training
also on CPUs with native bf16 when asked: config `train_precision`), channels_last
memory format on CUDA and CPU (oneDNN's CPU convolutions prefer it too: small_cnn trains ~25% and
attacks ~20% faster on CPU with it, benchmarks/RESULTS.md)."""
from __future__ import annotations

import contextlib

import torch

from .config import PRECISIONS


def select_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch sees no GPU; use device 'cpu'")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX tiles), where oneDNN's bf16
    convolutions beat fp32; elsewhere torch emulates bf16 and it is slower than fp32."""
    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(probe is not None and probe() for probe in probes)


def uses_bf16(device: torch.device, precision: str = "auto") -> bool:
    """Whether `autocast(device, precision)` computes in bf16: "auto" on CUDA only, "bf16" on CUDA
    and on CPUs with native bf16, "fp32" never. Raises ValueError for another precision."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return False
    if device.type == "cuda":
        return True
    return precision == "bf16" and device.type == "cpu" and cpu_has_native_bf16()


def autocast(device: torch.device, precision: str = "auto"):
    """bf16 autocast (no loss scaling needed, unlike fp16) where `uses_bf16(device, precision)`,
    else full precision. Evaluation calls it with "auto": attacks run in fp32 on CPU."""
    if uses_bf16(device, precision):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def full_precision(device: torch.device):
    """Autocast off inside an autocast region: where an attack's outcome is decided (is this example
    classified correctly?), so that a search run in bf16 is judged on the full-precision model."""
    return torch.autocast(device.type, enabled=False)


def prepare_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    model = model.to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return model.to(memory_format=torch.channels_last)


def prepare_input(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x
