"""Compose the Hydra config tree outside a Hydra entry point (tests, benchmarks, notebooks)."""

from __future__ import annotations

from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from pipelines import CONF_DIR


def load_config(overrides: list[str] | None = None, config_name: str = "config") -> dict[str, Any]:
    """The composed config as a plain dict, exactly as `python pipelines/X.py overrides...` sees it."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose(config_name=config_name, overrides=list(overrides or []))
    return OmegaConf.to_container(cfg, resolve=True)
