"""Connecting an entry point to Ray: the one way every pipeline does it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]


def connect(address: str | None = None, num_cpus: float | None = None,
            runtime_env: dict[str, Any] | None = None) -> None:
    """Join the running cluster (`address`, RAY_ADDRESS, `ray submit`, `ray job submit`), or
    start a local one with `num_cpus` logical CPUs and this source tree on the workers' path."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env)
        return
    if runtime_env is None and (_ROOT / "medseg_core").is_dir():
        runtime_env = {"env_vars": {"PYTHONPATH": str(_ROOT)}}
    ray.init(num_cpus=int(num_cpus) if num_cpus else None, include_dashboard=False,
             runtime_env=runtime_env)
