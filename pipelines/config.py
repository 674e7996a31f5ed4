"""Compose and resolve the Hydra config tree (entry points, tests, benchmarks, notebooks)."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from medseg_core.io import check_url_credentials
from pipelines import CONF_DIR


def _absolute(path: Any) -> Any:
    """A local path made absolute, `~` expanded as a shell would (`output_dir='~/out'` wrote
    to a folder named `~` in the working directory)."""
    if isinstance(path, str) and path and "://" not in path:
        return os.path.abspath(os.path.expanduser(path))
    return path


# Settings that hold a local path or URL, in any of the entry points' configs
PATH_KEYS = ("data.url", "data.report", "train.classifier_masks.segmenter", "evaluate.segmenter",
             "evaluate.classifier", "evaluate.out", "pack.out", "input", "output",
             "bundles.segmenter", "bundles.classifier")


def check_whole(value: Any, name: str, low: int, high: int | None = None,
                none: bool = False) -> None:
    """A setting that must be a whole number from `low` (to `high`), or null with `none`:
    ValueError naming it otherwise (a bool or 2.5 is not one)."""
    if value is None and none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low or \
            (high is not None and value > high):
        span = f"from {low} to {high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be a whole number {span}{' or null' if none else ''}, "
                         f"got {value!r}")


def check_number(value: Any, name: str, low: float, strict: bool = False,
                 none: bool = False) -> None:
    """A real-valued setting that must be >= `low` (> `low` with `strict`), or null with
    `none`: ValueError naming it otherwise (a bool, a word or nan is not one)."""
    if value is None and none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or \
            value < low or (strict and value == low):
        span = f"{'>' if strict else '>='} {low:g}"
        raise ValueError(f"{name} must be a number {span}{' or null' if none else ''}, "
                         f"got {value!r}")


def check_flag(value: Any, name: str, none: bool = False) -> None:
    """A true/false setting (null too with `none`): ValueError naming it otherwise (a number or
    a word would act as true or false without saying so)."""
    if not isinstance(value, bool) and not (none and value is None):
        raise ValueError(f"{name} must be true or false, got {value!r}")


def check_actor_pool(pool: dict[str, Any], where: str) -> None:
    """A Ray Data actor pool's `concurrency` (null, a number of actors >= 1, or [min, max]),
    `num_cpus` (> 0) and `num_gpus` (>= 0), each null for its default."""
    c = pool.get("concurrency")
    if c is not None:
        if isinstance(c, int) and not isinstance(c, bool):
            check_whole(c, f"{where}.concurrency", 1)
        elif not (isinstance(c, (list, tuple)) and len(c) == 2
                  and all(isinstance(v, int) and not isinstance(v, bool) for v in c)
                  and 1 <= c[0] <= c[1]):
            raise ValueError(f"{where}.concurrency must be null, a number of actors >= 1 or "
                             f"[min, max] with 1 <= min <= max, got {c!r}")
    check_number(pool.get("num_cpus"), f"{where}.num_cpus", 0, strict=True, none=True)
    check_number(pool.get("num_gpus"), f"{where}.num_gpus", 0, none=True)


@contextlib.contextmanager
def explained_storage_errors() -> Iterator[None]:
    """An entry point's work, with object storage's "Unable to locate credentials" (botocore's
    NoCredentialsError, or a Ray task's error, which Ray re-raises as a subclass of its
    cause's class) turned into where medseg takes credentials from."""
    try:
        yield
    except Exception as exc:
        if _lacks_credentials(exc):
            raise PermissionError(
                "object storage asked for credentials and none were found: medseg takes them "
                "only from the environment (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "AWS_PROFILE, or the instance's role), never from its settings, on every node "
                "that reads or writes (on a cluster: the workers' IamInstanceProfile in "
                "cluster.yaml); for a public bucket set data.anonymous=true (the bulk job: "
                "storage.anonymous=true)") from exc
        unreachable = _found(exc, UNREACHABLE)
        if unreachable is not None:
            # botocore's own, after minutes of retries, came as a 100-line traceback
            raise ConnectionError(
                f"object storage did not answer ({type(unreachable).__name__}: {unreachable}): "
                "check the endpoint (data.endpoint_url; the bulk job's storage.endpoint_url; "
                "unset, AWS's or $AWS_ENDPOINT_URL), that it is an S3 endpoint and not another "
                "port of the server, and the network between this node and it") from exc
        refused = _found(exc, ("ClientError",))
        if isinstance(exc, PermissionError) and refused is not None:
            raise PermissionError(
                f"{exc} (object storage refused the request: check the credentials in the "
                "environment, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE, and "
                "their rights on the bucket; a public bucket needs data.anonymous=true)"
            ) from exc
        raise


# botocore's errors for an endpoint that refused, dropped or never answered the connection
UNREACHABLE = ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
               "ConnectionClosedError")


def _found(exc: BaseException, names: Sequence[str], depth: int = 0) -> BaseException | None:
    """The first exception of a class named in `names` in `exc`'s chain (cause, context, a Ray
    Train worker's or controller's failure)."""
    if any(t.__name__ in names for t in type(exc).__mro__):
        return exc
    if depth > 8:
        return None
    inner = [exc.__cause__, exc.__context__, getattr(exc, "controller_failure", None),
             *dict(getattr(exc, "worker_failures", None) or {}).values()]
    for e in inner:
        if isinstance(e, BaseException):
            hit = _found(e, names, depth + 1)
            if hit is not None:
                return hit
    return None


# what the entry points raise for a setting, an input or a machine they refuse, with a message
# that says what to change (LayoutError, BundleError, ... are ValueErrors)
REFUSALS = (ValueError, PermissionError, FileNotFoundError, RuntimeError, ConnectionError)


@contextlib.contextmanager
def reported_refusals() -> Iterator[None]:
    """An entry point's work, with a refusal (`REFUSALS`) printed as its type and message
    alone and exit status 1: the traceback Hydra printed before it buried the message a user
    needs. HYDRA_FULL_ERROR=1 shows the traceback, as for Hydra's own errors."""
    try:
        yield
    except REFUSALS as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        from pipelines.cluster import disconnect

        disconnect()  # the worker log lines Ray holds back come before the message, not after
        print(f"Error: {type(exc).__name__}: {exc}\n(HYDRA_FULL_ERROR=1 shows the traceback)",
              file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def _lacks_credentials(exc: BaseException) -> bool:
    """Whether `exc` is botocore's NoCredentialsError, or wraps one: as its cause, or as the
    failure of a Ray Train worker or controller (WorkerGroupError, ControllerError)."""
    return _found(exc, ("NoCredentialsError",)) is not None


# YAML 1.1 spellings of a boolean: Hydra (YAML 1.2) reads `overwrite=no` as the string "no",
# which Python takes as true
_BOOLEAN_WORDS = {"yes", "no", "on", "off", "true", "false"}


@functools.cache
def boolean_settings() -> frozenset[str]:
    """Names of the settings that are true/false in some file of pipelines/conf."""
    import yaml

    names: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if isinstance(value, bool):
                    names.add(str(key))
                walk(value)

    for path in Path(CONF_DIR).rglob("*.yaml"):
        walk(yaml.safe_load(path.read_text()))
    return frozenset(names)


def _refuse_url_credentials(node: Any, where: str = "") -> None:
    """Every URL in the settings (archive, outputs, bundles, endpoints) checked by
    `medseg_core.io.check_url_credentials`, naming its setting."""
    if isinstance(node, dict):
        for key, value in node.items():
            _refuse_url_credentials(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _refuse_url_credentials(value, f"{where}[{i}]")
    elif isinstance(node, str):
        check_url_credentials(node, where)


def _refuse_boolean_words(node: Any, where: str = "") -> None:
    """A boolean setting given as anything but true, false (or null, where its default is):
    a word (`no`, `off`, a quoted "false", `maybe`) or a number acted as true or false
    without saying so. Other settings (names, paths, env_vars) may hold any word."""
    if isinstance(node, dict):
        for key, value in node.items():
            name = f"{where}.{key}" if where else str(key)
            if str(key) in boolean_settings() and not isinstance(value, bool | None):
                if isinstance(value, str) and value.strip().lower() in _BOOLEAN_WORDS:
                    raise ValueError(f"{name}={value!r} is a string, not a boolean: write "
                                     f"{name}=true or {name}=false")
                raise ValueError(f"{name} must be true or false, got {value!r}")
            _refuse_boolean_words(value, name)


PROGRESS_MODES = ("bars", "log", "off")


def _resolve_progress(out: dict[str, Any]) -> None:
    """`data.read.progress: auto` becomes bars or log here, in the entry point's process: the
    Datasets that Ray Train's workers and controller build and run cannot see whether the
    user's terminal is one (their stdout is a log file), and Ray's bars drawn from there into
    a redirected log are thousands of cursor-movement lines per epoch."""
    read = (out.get("data") or {}).get("read")
    if not isinstance(read, dict) or "progress" not in read:
        return
    mode = read["progress"]
    if mode == "auto":
        read["progress"] = "bars" if sys.stdout.isatty() else "log"
    elif mode not in PROGRESS_MODES:
        raise ValueError(f"data.read.progress must be auto or one of {list(PROGRESS_MODES)}, "
                         f"got {mode!r}")


def resolve(cfg: DictConfig) -> dict[str, Any]:
    """The config as a plain dict, with local paths made absolute: Ray workers run in their
    own working directory, so a relative `./outputs` would land inside Ray's session. A
    required setting left at `???` is an error naming it (it would otherwise become a path
    called `???`), and so is a boolean setting spelt `no`, `off`, `yes`, `on` or a quoted
    `"false"`: a string, which would act as true. So is a URL that carries credentials
    (`user:password@`): medseg takes them only from the environment."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ValueError(f"required setting(s) not given: {', '.join(missing)}; set them on "
                         f"the command line, e.g. {missing[0]}=<value>")
    if cfg.get("output_dir") is not None:
        cfg.output_dir = _absolute(cfg.output_dir)  # before interpolations that use it
    # as written first, so the setting named is the one that holds the URL, not one that
    # interpolates it
    _refuse_url_credentials(OmegaConf.to_container(cfg, resolve=False))
    out = OmegaConf.to_container(cfg, resolve=True)
    _refuse_boolean_words(out)
    _refuse_url_credentials(out)
    _resolve_progress(out)
    for dotted in PATH_KEYS:
        *parents, key = dotted.split(".")
        node = out
        for name in parents:
            node = node.get(name) if isinstance(node, dict) else None
        if isinstance(node, dict) and key in node:
            node[key] = _absolute(node[key])
    return out


def load_config(overrides: list[str] | None = None, config_name: str = "config") -> dict[str, Any]:
    """The resolved config, exactly as `python pipelines/X.py overrides...` sees it."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose(config_name=config_name, overrides=list(overrides or []))
    return resolve(cfg)
