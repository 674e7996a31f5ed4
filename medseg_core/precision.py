"""Where bf16 autocast pays off: GPUs, and CPUs that compute bf16 natively."""

from __future__ import annotations

import torch


def native_bf16(device: torch.device | str) -> bool:
    """Whether `device` computes in bf16 natively: a CUDA GPU that supports it, or a CPU with
    AVX512-BF16 or AMX instructions. Elsewhere bf16 is emulated and slower than float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    # private probes, present since torch 2.1; a build without them counts as no support
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def amp_dtype(device: torch.device | str, gpu: bool, cpu: bool) -> torch.dtype | None:
    """The autocast dtype for `device`: bf16 where it is asked for on that kind of device (`gpu`,
    `cpu`) and `native_bf16` there, else None (float32)."""
    kind = torch.device(device).type
    wanted = gpu if kind == "cuda" else cpu if kind == "cpu" else False
    return torch.bfloat16 if wanted and native_bf16(device) else None
