"""The model bundle: one directory (local path, file://, s3://, memory://, any fsspec URL) with

- `weights.pt`   the model's state_dict (torch.save; always loaded with weights_only=True),
- `config.yaml`  model config (for `build_model`) and everything pre/post-processing needs,
- `metrics.json` evaluation metrics at save time,
- `version`      a short text id, written last: a directory without it is not (yet) a bundle.

The same bundle is used for training checkpoints, online serving and batch jobs. A training
checkpoint also holds `train_state.pt` (`save_train_state`): the optimizer state to resume with.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import torch
import yaml
from torch import nn

from .io import remove_path
from .models import build_model

WEIGHTS_FILE = "weights.pt"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
VERSION_FILE = "version"
TRAIN_STATE_FILE = "train_state.pt"
BUNDLE_KEYS = (
    "model",
    "task",
    "input_size",
    "in_channels",
    "mean",
    "std",
    "threshold",
    "class_names",
    "inference",
)
TASKS = ("segmentation", "classification")


class BundleError(ValueError):
    """A model bundle is missing, incomplete or unreadable (the message names its URL)."""


class BundleNotFoundError(BundleError):
    """There is nothing at a model bundle's URL."""


@dataclass
class Bundle:
    """A loaded bundle: the model in eval mode plus its config, metrics, version and URI."""

    model: nn.Module
    config: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    version: str = ""
    uri: str = ""


def make_bundle_config(
    model: Mapping[str, Any],
    *,
    task: str,
    input_size: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    in_channels: int | None = None,
    threshold: float | None = 0.5,
    class_names: Sequence[str] | None = None,
    inference: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble a bundle config with every key of `BUNDLE_KEYS`.

    `in_channels` defaults to `model["in_channels"]` (else 3); `inference` to
    {"mode": "resize", "tile_overlap": 0.25}.
    """
    return {
        "model": dict(model),
        "task": task,
        "input_size": [int(s) for s in input_size],
        "in_channels": int(in_channels if in_channels is not None else model.get("in_channels", 3)),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "threshold": threshold,
        "class_names": list(class_names) if class_names is not None else None,
        "inference": dict(inference)
        if inference is not None
        else {"mode": "resize", "tile_overlap": 0.25},
    }


def _plain(value: Any) -> Any:
    """Convert tuples, numpy values and mappings (e.g. OmegaConf) to YAML/JSON-safe builtins."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.Tensor):
        return _plain(value.detach().cpu().tolist())
    return value


def _unwrap(model: nn.Module) -> nn.Module:
    # DistributedDataParallel keeps the model in .module, torch.compile in ._orig_mod.
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in _unwrap(model).state_dict().items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value.detach().cpu().contiguous()
    return out


def _validate_config(config: Mapping[str, Any]) -> None:
    missing = [k for k in BUNDLE_KEYS if k not in config]
    if missing:
        raise ValueError(f"bundle config is missing keys {missing} (required: {list(BUNDLE_KEYS)})")
    if config["task"] not in TASKS:
        raise ValueError(f"bundle config task must be one of {TASKS}, got {config['task']!r}")
    if not isinstance(config["model"], Mapping) or "name" not in config["model"]:
        raise ValueError("bundle config 'model' must be a build_model config with a 'name'")
    _validate_input(config)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _validate_input(config: Mapping[str, Any]) -> None:
    """The values that make the model's input and masks: a std of 0, a NaN mean or a threshold
    outside (0, 1) loaded and then made every mask empty or full."""
    size, channels = config["input_size"], config["in_channels"]
    if not (_whole(size) or isinstance(size, (list, tuple)) and len(size) == 2
            and all(_whole(v) for v in size)):
        raise ValueError(f"bundle config input_size must be a whole number or [height, width] "
                         f">= 1, got {size!r}")
    if not _whole(channels):
        raise ValueError(f"bundle config in_channels must be a whole number >= 1, got {channels!r}")
    built = config["model"].get("in_channels", channels)
    if built != channels:  # failed only at the first prediction, in a convolution
        raise ValueError(f"bundle config in_channels={channels} but its model takes "
                         f"in_channels={built}")
    for key in ("mean", "std"):
        values = config[key] if isinstance(config[key], (list, tuple)) else [config[key]]
        if len(values) not in (1, channels) or not all(_number(v) for v in values) or (
                key == "std" and not all(v > 0 for v in values)):
            raise ValueError(f"bundle config {key} must be 1 or in_channels={channels} finite "
                             f"numbers{' > 0' if key == 'std' else ''}, got {config[key]!r}")
    threshold = config["threshold"]
    if threshold is not None and not (_number(threshold) and 0 < threshold < 1):
        raise ValueError(f"bundle config threshold must be strictly between 0 and 1, got "
                         f"{threshold!r}")


def _join(path: str, name: str) -> str:
    return f"{path.rstrip('/')}/{name}"


def save_bundle(
    url: str,
    model: nn.Module,
    config: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    version: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Write `model` as a bundle directory at `url` and return the URL.

    `config` must hold every key in `BUNDLE_KEYS` (see `make_bundle_config`); `config["model"]`
    must build a model whose parameters match `model`'s (checked before anything is written).
    `version` defaults to "<UTC timestamp>-<first 10 hex digits of the weights' sha256>".
    An existing bundle at `url` is overwritten; its `version` file is removed first and the new
    one written last, so readers never load a half-written bundle.
    """
    _validate_config(config)
    config = _plain(config)
    state = _state_dict(model)
    expected = build_model(config["model"]).state_dict()
    mismatched = sorted(
        set(expected) ^ set(state)
        | {k for k in set(expected) & set(state) if expected[k].shape != state[k].shape}
    )
    if mismatched:
        raise ValueError(
            f"model does not match config['model'] {config['model']}: "
            f"{len(mismatched)} mismatched entries, e.g. {mismatched[:5]}"
        )
    buffer = io.BytesIO()
    torch.save(state, buffer)
    weights = buffer.getvalue()
    if version is None:
        digest = hashlib.sha256(weights).hexdigest()[:10]
        version = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{digest}"
    version = str(version).strip()
    if not version or "\n" in version:
        raise ValueError(f"version must be a non-empty single line, got {version!r}")
    metrics_text = json.dumps(_plain(metrics or {}), indent=2, sort_keys=True)
    # everything serialised before the old bundle is touched: a value YAML cannot represent
    # must fail here, not after the old version file is gone
    config_text = yaml.safe_dump(config, sort_keys=False)

    url = url.rstrip("/")
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    fs.makedirs(path, exist_ok=True)
    version_path = _join(path, VERSION_FILE)
    if fs.exists(version_path):
        remove_path(fs, version_path)
    fs.pipe_file(_join(path, WEIGHTS_FILE), weights)
    fs.pipe_file(_join(path, CONFIG_FILE), config_text.encode())
    fs.pipe_file(_join(path, METRICS_FILE), metrics_text.encode())
    fs.pipe_file(version_path, (version + "\n").encode())
    return url


def _read(fs: Any, path: str, name: str, url: str) -> bytes:
    try:
        return fs.cat_file(_join(path, name))
    except FileNotFoundError:
        if not fs.exists(path):
            raise BundleNotFoundError(f"model bundle {url} does not exist") from None
        raise BundleError(f"model bundle {url} has no {name}") from None
    except OSError as exc:
        raise BundleError(f"cannot read {name} of model bundle {url}: {exc}") from exc


def read_bundle_meta(url: str, storage_options: dict[str, Any] | None = None
                     ) -> tuple[str, dict[str, Any]]:
    """(version, config) of the bundle at `url` from its two small text files, without
    loading the weights. Raises BundleError naming the URL when either is missing."""
    url = url.rstrip("/")
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    version = _read(fs, path, VERSION_FILE, url).decode("utf-8", errors="replace").strip()
    try:
        config = yaml.safe_load(_read(fs, path, CONFIG_FILE, url)) or {}
    except yaml.YAMLError as exc:
        raise BundleError(f"{CONFIG_FILE} of model bundle {url} is not valid YAML: {exc}") from exc
    if not isinstance(config, dict):
        raise BundleError(f"{CONFIG_FILE} of model bundle {url} is not a mapping")
    return version, config


def check_bundle_task(url: str, task: str, setting: str,
                      storage_options: dict[str, Any] | None = None
                      ) -> tuple[str, dict[str, Any]]:
    """`read_bundle_meta` of the bundle that setting `setting` names, refusing one of another
    task (a classifier given as the segmenter, or the reverse) with a BundleError naming the
    setting, the URL and both tasks, before any model is loaded or image read."""
    try:
        version, config = read_bundle_meta(url, storage_options)
    except BundleError as exc:
        raise type(exc)(f"{setting}: {exc}") from None
    have = config.get("task")
    if have != task:
        raise BundleError(f"{setting}: model bundle {url.rstrip('/')} is a {have!r} bundle; "
                          f"{setting} needs a {task!r} one")
    return version, config


def load_bundle(
    url: str,
    *,
    map_location: str | torch.device = "cpu",
    storage_options: dict[str, Any] | None = None,
) -> Bundle:
    """Load the bundle at `url`: the model (built with `build_model(config["model"])`, weights
    loaded with `weights_only=True`, moved to `map_location`, eval mode), config, metrics,
    version. Raises BundleError naming the URL when the directory has no `version` file (not a
    bundle, or half-written) or a file is missing or garbled."""
    url = url.rstrip("/")
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if not fs.exists(_join(path, VERSION_FILE)):
        what = (
            "does not exist"
            if not fs.exists(path)
            else "has no 'version' file (half-written or not a bundle)"
        )
        raise BundleError(f"model bundle {url} {what}")
    version = _read(fs, path, VERSION_FILE, url).decode("utf-8", errors="replace").strip()

    try:
        config = yaml.safe_load(_read(fs, path, CONFIG_FILE, url))
    except yaml.YAMLError as exc:
        raise BundleError(f"{CONFIG_FILE} of model bundle {url} is not valid YAML: {exc}") from exc
    if not isinstance(config, dict):
        raise BundleError(f"{CONFIG_FILE} of model bundle {url} is not a mapping")
    try:
        _validate_config(config)
    except ValueError as exc:
        raise BundleError(f"{CONFIG_FILE} of model bundle {url}: {exc}") from exc

    try:
        metrics = json.loads(_read(fs, path, METRICS_FILE, url))
    except BundleError:
        raise
    except ValueError as exc:
        raise BundleError(f"{METRICS_FILE} of model bundle {url} is not valid JSON: {exc}") from exc

    weights = _read(fs, path, WEIGHTS_FILE, url)
    try:
        state = torch.load(io.BytesIO(weights), map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        # (an empty or truncated file gives "" or "negative seek value")
        raise BundleError(f"cannot load {WEIGHTS_FILE} of model bundle {url} ({len(weights)} "
                          f"bytes: truncated, or not a torch weights file): "
                          f"{str(exc) or type(exc).__name__}") from exc

    try:
        model = build_model(config["model"])
        model.load_state_dict(state)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise BundleError(f"weights of model bundle {url} do not fit its config: {exc}") from exc
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    model.eval()
    return Bundle(model=model, config=config, metrics=metrics, version=version, uri=url)


def save_train_state(
    url: str, state: Mapping[str, Any], storage_options: dict[str, Any] | None = None
) -> str:
    """Write `state` (tensors, numbers, strings, lists, tuples and dicts of them, e.g. an
    optimizer's `state_dict()` under a key) as `train_state.pt` of the directory `url`; returns
    the file's URL. Write it before `save_bundle` so the bundle's `version` stays the last file."""
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    fs, path = fsspec.core.url_to_fs(url.rstrip("/"), **(storage_options or {}))
    fs.makedirs(path, exist_ok=True)
    fs.pipe_file(_join(path, TRAIN_STATE_FILE), buffer.getvalue())
    return _join(url.rstrip("/"), TRAIN_STATE_FILE)


def load_train_state(
    url: str,
    *,
    map_location: str | torch.device = "cpu",
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """The `train_state.pt` of the directory `url` (loaded with `weights_only=True`), or None
    when it has none (a bundle saved without it). Raises BundleError for an unreadable file."""
    fs, path = fsspec.core.url_to_fs(url.rstrip("/"), **(storage_options or {}))
    try:
        blob = fs.cat_file(_join(path, TRAIN_STATE_FILE))
    except FileNotFoundError:
        return None
    try:
        state = torch.load(io.BytesIO(blob), map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise BundleError(f"cannot load {TRAIN_STATE_FILE} of {url}: {exc}") from exc
    if not isinstance(state, dict):
        raise BundleError(f"{TRAIN_STATE_FILE} of {url} is not a mapping")
    return state
