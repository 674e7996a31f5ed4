"""Where bf16 autocast pays off: GPUs, and CPUs that compute bf16 natively."""

from __future__ import annotations

import re
import warnings

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


def amp_dtype(device: torch.device | str, gpu: bool, cpu: bool,
              setting: str | None = None) -> torch.dtype | None:
    """The autocast dtype for `device`: bf16 where it is asked for on that kind of device (`gpu`,
    `cpu`) and `native_bf16` there, else None (float32). Asked for where it is not native, it
    warns naming `setting` (None: silently)."""
    kind = torch.device(device).type
    wanted = gpu if kind == "cuda" else cpu if kind == "cpu" else False
    if not wanted:
        return None
    if native_bf16(device):
        return torch.bfloat16
    if setting is not None:
        warnings.warn(f"{setting}=true, but {device} has no native bf16 (on a CPU: AVX512-BF16 "
                      "or AMX), where bf16 is slower than float32: running in float32",
                      stacklevel=2)
    return None


_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device(name: object, setting: str) -> str:
    """A device setting: auto, cpu, cuda or cuda:N (ValueError naming `setting` otherwise; a
    misspelt one failed only where the model was moved, after listing or in a Ray actor)."""
    if not isinstance(name, str) or not _DEVICE.match(name):
        raise ValueError(f"{setting} must be auto, cpu, cuda or cuda:N, got {name!r}")
    return name


def cuda_devices() -> int:
    """The CUDA devices torch sees here (0 on a CPU-only build)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(name: str, setting: str = "device") -> torch.device:
    """`check_device`'s name as a torch device: auto is CUDA where torch sees a GPU, else CPU."""
    if check_device(name, setting) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":  # else torch's AssertionError, deep in the first model move
        count = cuda_devices()
        if (device.index or 0) >= count:
            build = " (a CPU-only build of torch)" if torch.version.cuda is None else ""
            raise ValueError(f"{setting}={name}, but torch sees {count} CUDA device(s) "
                             f"here{build}: use auto or cpu, or run where that GPU is")
    return device
