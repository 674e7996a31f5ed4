"""Build models from plain config dicts: `{"name": ..., **constructor_kwargs}`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from .attention_unet import AttentionUNet
from .classifier import LesionClassifier
from .improved_unet import ImprovedUNet
from .unet import UNet


def _unet_bn(**kwargs: Any) -> UNet:
    kwargs.setdefault("norm", "batch")
    return UNet(**kwargs)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "unet": UNet,
    "unet_bn": _unet_bn,
    "improved_unet": ImprovedUNet,
    "attention_unet": AttentionUNet,
    "classifier": LesionClassifier,
}


def _plain(value: Any) -> Any:
    # YAML/OmegaConf give lists where constructors expect tuples; convert recursively.
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return tuple(_plain(v) for v in value)
    return value


def build_model(cfg: dict[str, Any]) -> nn.Module:
    """Build the model named `cfg["name"]` with the remaining keys as constructor kwargs.

    Names: unet, unet_bn (UNet with batch norm), improved_unet, attention_unet, classifier.
    `cfg` is not modified. Raises ValueError for an unknown or missing name and TypeError
    (naming the model) for unknown kwargs.
    """
    if not isinstance(cfg, dict) and hasattr(cfg, "items"):
        cfg = dict(cfg.items())
    if "name" not in cfg:
        raise ValueError(f"model config has no 'name'; valid names: {sorted(MODELS)}")
    name = cfg["name"]
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {sorted(MODELS)}")
    kwargs = {k: _plain(v) for k, v in cfg.items() if k != "name"}
    try:
        return MODELS[name](**kwargs)
    except TypeError as exc:
        raise TypeError(f"bad config for model {name!r}: {exc}") from exc
