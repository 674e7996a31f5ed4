"""Compose and resolve the Hydra config tree (entry points, tests, benchmarks, notebooks)."""

from __future__ import annotations

import os
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from pipelines import CONF_DIR


def _absolute(path: Any) -> Any:
    if isinstance(path, str) and path and "://" not in path:
        return os.path.abspath(path)
    return path


def resolve(cfg: DictConfig) -> dict[str, Any]:
    """The config as a plain dict, with local paths made absolute: Ray Train workers run in
    their own working directory, so a relative `./outputs` would land inside Ray's session."""
    if cfg.get("output_dir") is not None:
        cfg.output_dir = _absolute(cfg.output_dir)  # before interpolations that use it
    out = OmegaConf.to_container(cfg, resolve=True)
    data = out.get("data")
    if isinstance(data, dict):
        for key in ("url", "report"):
            if key in data:
                data[key] = _absolute(data[key])
    return out


def load_config(overrides: list[str] | None = None, config_name: str = "config") -> dict[str, Any]:
    """The resolved config, exactly as `python pipelines/X.py overrides...` sees it."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose(config_name=config_name, overrides=list(overrides or []))
    return resolve(cfg)
