"""The medseg online endpoint on Ray Serve: decode -> Segmenter -> Classifier -> JSON.

Three deployments, composed through deployment handles:

- ``Segmenter`` and ``Classifier`` each load one model bundle (local path, ``file://`` or
  ``s3://``; credentials from the environment only) into ``medseg_core.inference.Segmenter`` /
  ``Classifier`` and batch concurrent requests with ``@serve.batch``; batching comes from the
  deployment's ``user_config`` and can change live. Each runs on a GPU when Ray gives its
  replica one (``ray_actor_options.num_gpus``).
- ``Ingress`` (FastAPI via ``@serve.ingress``) authenticates, enforces byte and pixel limits,
  decodes the image, calls both models and summarises the result with
  ``medseg_core.inference.summarize_prediction``, the function ``Chain.predict`` uses, so the
  response equals ``Chain.predict`` run in-process on the same bundles and image.

``build_app(args)`` is the application builder named by ``serving/config.yaml``
(``import_path: serving.app:build_app``); ``args`` validate as ``serving.schemas.AppArgs``.
"""

import asyncio
import base64
import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import numpy as np
import ray
import torch
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray import serve
from ray.exceptions import RayActorError, TaskCancelledError
from ray.serve import Application
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from medseg_core.checkpoint import Bundle, check_bundle_task, load_bundle
from medseg_core.inference import Classifier, Segmenter, summarize_prediction
from medseg_core.io import (
    ImageDecodeError,
    ImageTooLargeError,
    decode_image,
    encode_mask_png,
    exif_orientation,
    image_size,
    rle_encode,
)
from serving.budget import PixelBudget
from serving.inputs import (
    GENERIC_PART_TYPES,
    MULTIPART,
    ApiError,
    bearer_token,
    check_content_length,
    load_token,
    media_type,
    parse_multipart,
    read_limited,
    sniff,
    token_matches,
)
from serving.schemas import (
    IMAGE_CONTENT_TYPES,
    AppArgs,
    BatchingConfig,
    ErrorResponse,
    HealthResponse,
    MaskFormat,
    ModelArgs,
    ModelsResponse,
    PredictResponse,
    SegmenterArgs,
    StorageArgs,
)

logger = logging.getLogger("ray.serve")

_DEFAULT_BATCHING = BatchingConfig()


def _ms(start: float, end: float) -> float:
    return round((end - start) * 1000.0, 3)


# ------------------------------------------------------------------------------ model replicas


def resolve_device(requested: str) -> str:
    """'auto' -> 'cuda' when Ray assigned this process a GPU and torch sees one, else 'cpu'."""
    if requested == "auto":
        gpus = []
        if ray.is_initialized():  # ray.get_gpu_ids() would start a Ray instance otherwise
            try:
                gpus = ray.get_gpu_ids()
            except Exception:  # not inside a Ray worker
                gpus = []
        return "cuda" if gpus and torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"device {requested!r} requested but CUDA is not available in this replica "
            "(ask for a GPU with ray_actor_options.num_gpus)"
        )
    return requested


def _bundle_location(uri: str) -> str:
    """Plain relative paths resolve against the replica's working directory (Ray starts
    workers in the driver's), made absolute so errors name the file actually tried."""
    if "://" in uri:
        return uri
    return os.path.abspath(os.path.expanduser(uri))


class _ModelReplica:
    """Bundle loading, device choice, batching settings and info shared by both models."""

    task = ""
    batch_method = ""
    settings: type[ModelArgs] = ModelArgs

    def __init__(self, model: Mapping[str, Any] | ModelArgs,
                 storage: Mapping[str, Any] | StorageArgs | None = None) -> None:
        self.args = self.settings.model_validate(
            model.model_dump() if isinstance(model, ModelArgs) else model)
        storage_args = StorageArgs.model_validate(storage or {})
        if self.args.torch_threads:
            torch.set_num_threads(self.args.torch_threads)
        self.device = resolve_device(self.args.device)
        self.uri = _bundle_location(self.args.bundle_uri)
        start = time.perf_counter()
        options = storage_args.options_for(self.uri) or None
        self.bundle: Bundle = load_bundle(self.uri, storage_options=options)
        task = self.bundle.config.get("task")
        if task != self.task:
            raise ValueError(f"model bundle {self.uri} is a {task!r} bundle; the "
                             f"{type(self).__name__} deployment needs a {self.task!r} one")
        self.runner = self._build(self.bundle)
        self.batching = _DEFAULT_BATCHING
        self.batching_error: str | None = None
        self._apply_batching()
        if self.args.warmup:
            self._warmup()
        logger.info("%s: loaded bundle %s (version %s) on %s in %.1f s", type(self).__name__,
                    self.uri, self.bundle.version, self.device, time.perf_counter() - start)

    # subclasses
    def _build(self, bundle: Bundle) -> Segmenter | Classifier:
        raise NotImplementedError

    def _warmup(self) -> None:
        raise NotImplementedError

    def _blank(self) -> np.ndarray:
        h, w = (int(s) for s in self.bundle.config["input_size"])
        return np.zeros((h, w, 3), dtype=np.uint8)

    # Serve hooks
    def reconfigure(self, user_config: Mapping[str, Any] | None) -> None:
        """Apply the deployment's user_config (BatchingConfig); runs again on every change.

        A bad one is logged and reported in /v1/models (`batching_error`) while the replica
        keeps its batching: raising here made Serve stop the running replicas, and the
        deployment answered nothing until a good config came."""
        try:
            batching = BatchingConfig.model_validate(user_config or {})
        except ValueError as exc:
            self.batching_error = " ".join(str(exc).split())
            logger.error("%s: user_config refused, batching stays %s: %s", type(self).__name__,
                         self.batching.model_dump(), self.batching_error)
            return
        self.batching, self.batching_error = batching, None
        self._apply_batching()
        logger.info("%s: batching %s", type(self).__name__, self.batching.model_dump())

    def _apply_batching(self) -> None:
        method = getattr(self, self.batch_method)
        method.set_max_batch_size(self.batching.max_batch_size)
        method.set_batch_wait_timeout_s(self.batching.batch_wait_timeout_s)

    def check_health(self) -> None:
        if self.runner is None:
            raise RuntimeError("model not loaded")

    def info(self) -> dict[str, Any]:
        """What /v1/models reports (no credentials: the URI is the configured one)."""
        config = self.bundle.config
        return {
            "uri": self.uri,
            "version": self.bundle.version,
            "task": config.get("task"),
            "model": dict(config.get("model") or {}),
            "input_size": list(config.get("input_size") or []) or None,
            "in_channels": config.get("in_channels"),
            "threshold": config.get("threshold"),
            "class_names": config.get("class_names"),
            "lesion_free_classes": config.get("lesion_free_classes") or [],
            "inference": config.get("inference"),
            "device": self.device,
            # bf16 where `amp` asked for it and the device computes it (medseg_core.precision)
            "precision": "bfloat16" if self.runner.amp_dtype is not None else "float32",
            "torch_threads": torch.get_num_threads(),
            "batching": self.batching.model_dump(),
            "batching_error": self.batching_error,
        }


@serve.deployment(name="Segmenter")
class SegmenterDeployment(_ModelReplica):
    """Masks at each image's original resolution, from a segmentation bundle."""

    task = "segmentation"
    batch_method = "_segment_batch"
    settings = SegmenterArgs

    def _build(self, bundle: Bundle) -> Segmenter:
        return Segmenter(bundle, self.device, self.args.inference_batch_size, amp=self.args.amp,
                         max_work_pixels=self.args.max_work_pixels)

    def _warmup(self) -> None:
        self.runner.predict([self._blank()])

    async def segment(self, image: np.ndarray, threshold: float | None = None) -> dict[str, Any]:
        """uint8 HxWxC image -> {"mask": uint8 HxW in {0, 1}, "version": bundle version,
        "replica_ms": time in this replica, "model_ms": its batch's predict call}."""
        start = time.perf_counter()
        self.runner.check_work(image.shape)  # here, not in the batch: it would fail the others
        out = await self._segment_batch(image, threshold)
        return {**out, "replica_ms": _ms(start, time.perf_counter())}

    @serve.batch(max_batch_size=_DEFAULT_BATCHING.max_batch_size,
                 batch_wait_timeout_s=_DEFAULT_BATCHING.batch_wait_timeout_s)
    async def _segment_batch(self, images: list[np.ndarray],
                             thresholds: list[float | None]) -> list[dict[str, Any]]:
        # The forward pass runs in a worker thread so the replica's event loop keeps
        # accepting (and batching) requests meanwhile.
        return await asyncio.to_thread(self._segment_sync, images, thresholds)

    def _segment_sync(self, images: list[np.ndarray],
                      thresholds: list[float | None]) -> list[dict[str, Any]]:
        start = time.perf_counter()
        masks: list[np.ndarray | None] = [None] * len(images)
        groups: dict[float | None, list[int]] = {}
        for i, t in enumerate(thresholds):
            groups.setdefault(t, []).append(i)
        for t, indices in groups.items():  # one predict per distinct threshold (usually one)
            for i, mask in zip(indices, self.runner.predict([images[i] for i in indices], t)):
                masks[i] = mask
        model_ms = _ms(start, time.perf_counter())
        return [{"mask": m, "version": self.bundle.version, "model_ms": model_ms} for m in masks]


@serve.deployment(name="Classifier")
class ClassifierDeployment(_ModelReplica):
    """Class probabilities of (image, mask) pairs, from a classification bundle."""

    task = "classification"
    batch_method = "_classify_batch"

    def _build(self, bundle: Bundle) -> Classifier:
        return Classifier(bundle, self.device, self.args.inference_batch_size, amp=self.args.amp)

    def _warmup(self) -> None:
        blank = self._blank()
        self.runner.predict([blank], [np.zeros(blank.shape[:2], dtype=np.uint8)])

    async def classify(self, image: np.ndarray, mask: np.ndarray) -> dict[str, Any]:
        """-> {"probabilities": float32 (num_classes,), "names": class names, "lesion_free":
        the classes whose masks the chain clears, "version", "replica_ms", "model_ms"}."""
        start = time.perf_counter()
        out = await self._classify_batch(image, mask)
        return {**out, "replica_ms": _ms(start, time.perf_counter())}

    @serve.batch(max_batch_size=_DEFAULT_BATCHING.max_batch_size,
                 batch_wait_timeout_s=_DEFAULT_BATCHING.batch_wait_timeout_s)
    async def _classify_batch(self, images: list[np.ndarray],
                              masks: list[np.ndarray]) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self._classify_sync, images, masks)

    def _classify_sync(self, images: list[np.ndarray],
                       masks: list[np.ndarray]) -> list[dict[str, Any]]:
        start = time.perf_counter()
        probs = self.runner.predict(images, masks)
        names = list(self.runner.names_for(probs.shape[1]))
        model_ms = _ms(start, time.perf_counter())
        return [{"probabilities": p, "names": names, "lesion_free": self.runner.lesion_free,
                 "version": self.bundle.version, "model_ms": model_ms} for p in probs]


# ----------------------------------------------------------------------------- summarising


def encode_mask(mask: np.ndarray, fmt: MaskFormat | str) -> dict[str, Any]:
    size = [int(mask.shape[0]), int(mask.shape[1])]
    if MaskFormat(fmt) is MaskFormat.rle:
        return {"format": "rle", "size": size, "counts": rle_encode(mask)["counts"]}
    return {"format": "png", "size": size,
            "data": base64.b64encode(encode_mask_png(mask)).decode("ascii")}


def response_body(mask: np.ndarray, cls: Mapping[str, Any], fmt: MaskFormat,
                  shape: tuple[int, ...], threshold: float | None, versions: dict[str, str],
                  timings: dict[str, float], t0: float,
                  orientation: int | None = None) -> bytes:
    """The JSON of a prediction (`PredictResponse`); `timings` gets `postprocess_ms` and
    `total_ms`, from `t0`, the request's start; `orientation`: the image's EXIF orientation
    (not applied)."""
    t4 = time.perf_counter()
    result = summarize_prediction(mask, np.asarray(cls["probabilities"]), cls["names"],
                                  cls.get("lesion_free", ()))
    encoded = encode_mask(result["mask"], fmt)
    t5 = time.perf_counter()
    return json.dumps({
        "label": result["label"],
        "label_name": result["label_name"],
        "probabilities": result["probabilities"],
        "mask": encoded,
        "lesion_area_fraction": result["lesion_area_fraction"],
        "bbox": result["bbox"],
        "image_size": [int(shape[0]), int(shape[1])],
        "exif_orientation": orientation,
        "threshold": threshold,
        "model_versions": versions,
        "timings": {**timings, "postprocess_ms": _ms(t4, t5), "total_ms": _ms(t0, t5)},
    }, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


async def gather_model_infos(calls: Mapping[str, Callable[[], Awaitable[Any]]],
                             timeout_s: float) -> dict[str, Any]:
    """Ask every model deployment for its info concurrently; 503 naming the ones that did not
    answer within `timeout_s` (still loading, failed, or gone)."""

    async def one(name: str, call: Callable[[], Awaitable[Any]]) -> tuple[str, Any, str | None]:
        try:
            return name, await asyncio.wait_for(call(), timeout_s), None
        except asyncio.TimeoutError:
            return name, None, f"no answer within {timeout_s:g} s"
        except Exception as exc:  # replica failed, deployment missing, ...
            return name, None, type(exc).__name__

    results = await asyncio.gather(*(one(n, c) for n, c in calls.items()))
    not_ready([f"{name} ({why})" for name, _, why in results if why is not None])
    return {name: info for name, info, _ in results}


def not_ready(problems: list[str]) -> None:
    """503 naming the model deployments in `problems`, if any."""
    if problems:
        raise ApiError(503, "not_ready", "model deployments not ready: " + ", ".join(problems),
                       {"Retry-After": "5"})


class ModelReadiness:
    """Readiness of the model deployments, asked with `gather_model_infos` only until all of
    them have answered once; afterwards the infos are kept, so /healthz does not queue behind
    prediction batches under load and report 503 for loaded models. `reset()` (a deployment
    became unavailable) makes the next `infos()` ask again.

    While the infos are kept, `replicas` (per model deployment: its running replicas and a
    problem or None, as Serve's controller reports them: it answers whatever the models'
    load) is asked at most every `replicas_ttl_s`; a problem makes it not ready. Without this
    /healthz answered "ok" for minutes while a segmenter whose bundle had gone bad failed
    every restart and each prediction waited `model_timeout_s`."""

    def __init__(self, calls: Mapping[str, Callable[[], Awaitable[Any]]], timeout_s: float,
                 replicas: Callable[[], Awaitable[dict[str, tuple[int, str | None]]]]
                 | None = None,
                 replicas_ttl_s: float = 5.0) -> None:
        self._calls = dict(calls)
        self._timeout_s = timeout_s
        self._infos: dict[str, Any] | None = None
        self._replicas = replicas
        self._replicas_ttl_s = replicas_ttl_s
        self._replicas_at = -math.inf
        self.running: dict[str, int] | None = None

    @property
    def ready(self) -> bool:
        return self._infos is not None

    async def infos(self, refresh: bool = False) -> dict[str, Any]:
        """The models' infos: cached once all answered, asked again while not ready or when
        `refresh` is set (503 `ApiError` when one does not answer, or has no running
        replica)."""
        if self._infos is not None and not refresh:
            await self._check_replicas()
        if self._infos is None or refresh:
            self._infos = await gather_model_infos(self._calls, self._timeout_s)
        return self._infos

    async def _check_replicas(self) -> None:
        if self._replicas is None or time.monotonic() - self._replicas_at < self._replicas_ttl_s:
            return
        self._replicas_at = time.monotonic()
        try:
            states = await asyncio.wait_for(self._replicas(), self._timeout_s)
        except Exception as exc:  # the controller slow or restarting: keep the last answer
            logger.warning("Ingress: Serve's replica states unavailable (%s)",
                           type(exc).__name__)
            return
        self.running = {name: running for name, (running, _) in states.items()}
        problems = [f"{name} ({problem})" for name, (_, problem) in states.items() if problem]
        if problems:
            self.reset()
            not_ready(problems)

    def reset(self) -> None:
        self._infos = None
        self.running = None  # asked again once ready, not reported from before
        self._replicas_at = -math.inf

    def observe(self, versions: Mapping[str, str]) -> None:
        """Keep the cached infos' bundle versions at those a prediction just used, so /healthz
        follows a model deployment redeployed with another bundle (Serve leaves the Ingress
        running) without asking the busy models."""
        for name, version in versions.items():
            info = (self._infos or {}).get(name)
            if info is not None and info.get("version") != version:
                self._infos[name] = {**info, "version": version}


def model_call_error(what: str, exc: BaseException) -> ApiError:
    """The HTTP error for a failed call to the model deployment `what`."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ImageTooLargeError):  # Ray's error subclasses the replica's
        return ApiError(413, "image_too_large", str(getattr(exc, "cause", exc)))
    if isinstance(exc, BackPressureError):
        retry = str(max(1, math.ceil(exc.retry_after_s or 1)))
        return ApiError(503, "overloaded", f"{what} is at capacity; retry later",
                        {"Retry-After": retry})
    if isinstance(exc, DeploymentUnavailableError):
        return ApiError(503, "not_ready", f"{what} is unavailable")
    if isinstance(exc, RayActorError):  # ActorDiedError, ActorUnavailableError
        # the replica died or is unreachable mid-request; Serve replaces it, so a retry can
        # succeed on another (or the new) replica
        return ApiError(503, "unavailable", f"{what} replica failed during the request; "
                        "retry later", {"Retry-After": "1"})
    logger.error("%s failed: %s", what, type(exc).__name__)
    return ApiError(500, "internal_error", f"{what} failed")


# ------------------------------------------------------------------------------------ ingress

DESCRIPTION = """Lesion segmentation and classification of one image per request.

`POST /v1/predict` takes the raw image bytes (`Content-Type: image/png`, `image/jpeg`,
`image/bmp` or `image/tiff`) or a `multipart/form-data` upload (field `file`). The mask comes
back at the image's original resolution as a base64 PNG (`mask_format=png`) or COCO RLE
(`mask_format=rle`). Errors are JSON `{"error": {"code", "message"}}`: 400 not a readable
image, 401 missing/wrong bearer token (when the server has one), 413 too many bytes or pixels,
415 empty body or unsupported content type, 422 bad query values, 503 models not ready,
overloaded, a model replica failed mid-request or a model did not answer in time (with
`Retry-After`).
"""

app = FastAPI(title="medseg", version="1", description=DESCRIPTION)

_BINARY = {"schema": {"type": "string", "format": "binary"}}
PREDICT_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "The image: raw bytes with an image Content-Type, or multipart/form-data "
        "with the image in field `file` (or `image`, or else the first part with a filename; "
        "empty parts are passed over).",
        "content": {
            **{kind: _BINARY for kind in IMAGE_CONTENT_TYPES},
            MULTIPART: {"schema": {"type": "object", "properties": {
                "file": {"type": "string", "format": "binary"},
                "image": {"type": "string", "format": "binary",
                          "description": "Taken where there is no non-empty `file` part."}}}},
        },
    }
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": what}
    for status, what in {
        400: "Not a readable PNG/JPEG/BMP/TIFF image (garbage, truncated, corrupt).",
        401: "Missing or wrong bearer token (only when the server has a token).",
        408: "No byte of the request body arrived for `limits.body_idle_timeout_s`.",
        413: "Body larger than the byte limit, image larger than the pixel limit, or (tile-mode "
             "segmenter) an image whose tiles exceed the segmenter's work limit.",
        415: "Empty body, or a Content-Type other than the accepted image types and multipart.",
        422: "Bad query values (mask_format not png/rle, threshold not in (0, 1)), or a "
             "query parameter the route does not take or given twice.",
        500: "An error the server did not expect (logged by type, without the image).",
        503: "Model deployments not ready or overloaded, or a model replica failed "
             "mid-request (`Retry-After` says when to retry).",
    }.items()
}
_ERRORS[503]["headers"] = {"Retry-After": {
    "description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}}
_NOT_READY = {**_ERRORS[503], "description": "A model deployment has not answered yet, or has "
              "no running replica (`Retry-After` says when to ask again)."}


def error_response(status: int, code: str, message: str,
                   headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status,
                        headers=dict(headers or {}))


@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    if exc.status >= 500:
        logger.warning("%s %s -> %d %s", request.method, request.url.path, exc.status, exc.code)
    return error_response(exc.status, exc.code, exc.message, exc.headers)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        where = f"{loc[0]} parameter '{'.'.join(loc[1:])}'" if len(loc) > 1 else ".".join(loc)
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return error_response(422, "invalid_parameter", "; ".join(parts) or "invalid request")


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, (TaskCancelledError, ClientDisconnect)):
        # Serve cancels the request of a client that went away: nothing is wrong here
        logger.info("%s on %s %s: the client went away", type(exc).__name__, request.method,
                    request.url.path)
    else:
        logger.error("unhandled %s on %s %s", type(exc).__name__, request.method,
                     request.url.path)
    return error_response(500, "internal_error", "internal server error")


PREDICT_QUERY = ("mask_format", "threshold")


def check_query(request: Request, accepted: tuple[str, ...]) -> None:
    """422 for a query parameter the route does not take, or one given twice: a misspelt
    `treshold=0.3` was ignored, and the answer silently used the bundle's threshold."""
    names = Counter(k for k, _ in request.query_params.multi_items())
    unknown = sorted(n for n in names if n not in accepted)
    if unknown:
        raise ApiError(422, "invalid_parameter", f"unknown query parameter(s) "
                       f"{', '.join(repr(n[:64]) for n in unknown[:8])}; accepted: "
                       f"{', '.join(accepted)}")
    repeated = sorted(n for n, count in names.items() if count > 1)
    if repeated:
        raise ApiError(422, "invalid_parameter",
                       f"query parameter(s) given more than once: {', '.join(repeated)}")


async def require_token(
        request: Request,
        _: HTTPAuthorizationCredentials | None = Depends(HTTPBearer(auto_error=False))) -> None:
    """Route dependency: bearer-token check, run before query and body validation. (The
    HTTPBearer dependency only declares the scheme in the OpenAPI schema, for /docs.)"""
    serve.get_replica_context().servable_object.authorize(request)


@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    """HTTP front: validation, limits, decoding, composition of the two model deployments."""

    def __init__(self, segmenter: DeploymentHandle, classifier: DeploymentHandle,
                 settings: Mapping[str, Any] | AppArgs) -> None:
        self.settings = AppArgs.model_validate(settings)
        self.segmenter = segmenter
        self.classifier = classifier
        self.limits = self.settings.limits
        self.accepted = tuple(self.limits.content_types)
        auth = self.settings.auth
        self._token = load_token(auth.token_env, auth.token_file)
        sources = " or ".join(x for x in (auth.token_env and f"${auth.token_env}",
                                          auth.token_file) if x)
        if self._token is None and auth.required:
            raise RuntimeError(f"auth.required is set but no token in {sources}")
        logger.info("Ingress: bearer-token auth %s", f"on (token from {sources})"
                    if self._token else "off")
        self.pixels = PixelBudget(self.limits.max_inflight_pixels, self.limits.pixel_wait_s)
        self.readiness = ModelReadiness(
            {"segmenter": lambda: self.segmenter.info.remote(),
             "classifier": lambda: self.classifier.info.remote()},
            self.settings.health_timeout_s, self.running_replicas)

    # ---- helpers
    async def running_replicas(self) -> dict[str, tuple[int, str | None]]:
        """Per model deployment, from Serve's controller: its RUNNING replicas, and why it
        cannot answer (None where it can). None running is a problem where replicas are
        starting or failing, or the deployment is not healthy; a healthy one scaled to zero
        (`min_replicas: 0`) starts one for the next request."""
        app = serve.get_replica_context().app_name
        status = await asyncio.to_thread(serve.status)
        application = status.applications.get(app)
        deployments = application.deployments if application is not None else {}
        out: dict[str, tuple[int, str | None]] = {}
        for name, handle in (("segmenter", self.segmenter), ("classifier", self.classifier)):
            deployment = deployments.get(handle.deployment_name)
            if deployment is None:
                out[name] = (0, "not deployed")
                continue
            # Serve's str enums (ReplicaState, DeploymentStatus) by value
            states = {str(getattr(k, "value", k)): int(v)
                      for k, v in deployment.replica_states.items()}
            running = states.pop("RUNNING", 0)
            health = str(getattr(deployment.status, "value", deployment.status))
            problem = None
            if not running and (any(states.values()) or health != "HEALTHY"):
                problem = f"no running replica: {health}"
            out[name] = (running, problem)
        return out

    def authorize(self, request: Request) -> None:
        if self._token is None:
            return
        if not token_matches(bearer_token(request.headers.get("authorization")), self._token):
            raise ApiError(401, "unauthorized", "missing or invalid bearer token",
                           {"WWW-Authenticate": 'Bearer realm="medseg"'})

    async def _read_image_bytes(self, request: Request) -> bytes:
        header = request.headers.get("content-type")
        kind = media_type(header)
        accepted = ", ".join((*self.accepted, MULTIPART))
        if not kind:
            raise ApiError(415, "unsupported_media_type",
                           f"missing Content-Type; send one of: {accepted}")
        if kind != MULTIPART and kind not in self.accepted:
            raise ApiError(415, "unsupported_media_type",
                           f"Content-Type {kind!r} is not accepted; send one of: {accepted}")
        limit = self.limits.max_body_bytes
        check_content_length(request.headers.get("content-length"), limit)
        try:
            body = await read_limited(request.stream(), limit, self.limits.body_idle_timeout_s)
        except ClientDisconnect:
            raise ApiError(400, "bad_request", "client disconnected before the body ended") from None
        if not body:
            raise ApiError(415, "empty_body", "request body is empty; send the image bytes")
        if kind != MULTIPART:
            return body
        # off the event loop: even at C speed a 20 MB body is scanned a few times
        upload = await asyncio.to_thread(parse_multipart, body, header or "")
        part = upload.content_type
        if part and part not in self.accepted and part not in GENERIC_PART_TYPES:
            raise ApiError(415, "unsupported_media_type",
                           f"multipart file part has Content-Type {part!r}; send one of: "
                           f"{', '.join(self.accepted)}")
        if not upload.data:
            raise ApiError(415, "empty_body", "multipart file part is empty")
        return upload.data

    def _budgeted_pixels(self, data: bytes) -> int:
        """The image's pixels from its header; 0 for a body that decoding will refuse."""
        try:
            w, h = image_size(data, "request body")
        except ImageDecodeError:
            return 0
        return w * h if w * h <= self.limits.max_pixels else 0

    def _decode(self, data: bytes) -> tuple[np.ndarray, int | None]:
        """The pixels, and the EXIF orientation they are not turned by."""
        kind = sniff(data, self.accepted)
        try:
            # a grey image stays one plane: a third of the bytes to the model replicas, which
            # resize it before repeating it (inference.model_input)
            image = decode_image(data, 3, max_pixels=self.limits.max_pixels,
                                 name="request body", keep_grey=True)
            return image, exif_orientation(data, "request body")
        except ImageTooLargeError as exc:
            raise ApiError(413, "image_too_large", str(exc)) from None
        except ImageDecodeError as exc:
            message = str(exc)
            if "not a recognised image" in message:  # whose list names formats not served
                message = (f"request body: a {kind.split('/')[1].upper()} signature, but no "
                           "readable image after it (truncated or corrupt)")
            raise ApiError(400, "invalid_image", message) from None

    async def _call(self, what: str, response: Any) -> Any:
        try:
            return await asyncio.wait_for(response, self.settings.model_timeout_s)
        except TimeoutError:
            # a deployment with no running replica (one failing to start) holds requests
            # queued until Serve's HTTP timeout, while /healthz kept its cached "ok"
            response.cancel()
            self.readiness.reset()
            raise ApiError(503, "timeout", f"{what} did not answer within "
                           f"{self.settings.model_timeout_s:g} s (no replica running, or "
                           "overloaded); retry later", {"Retry-After": "5"}) from None
        except Exception as exc:
            if isinstance(exc, DeploymentUnavailableError):
                self.readiness.reset()
            raise model_call_error(what, exc) from None

    # ---- routes
    @app.post(
        "/v1/predict",
        summary="Segment and classify one image",
        response_model=PredictResponse,
        responses=_ERRORS,
        openapi_extra=PREDICT_OPENAPI,
        dependencies=[Depends(require_token)],
    )
    async def predict(
        self,
        request: Request,
        mask_format: MaskFormat | None = Query(
            None, description="Mask encoding: `png` (base64 PNG, 255 = lesion) or `rle` "
            "(COCO uncompressed RLE, column-major). Default from the server config."),
        threshold: float | None = Query(
            None, gt=0, lt=1, allow_inf_nan=False,  # nan was "Input should be less than 1"
            description="Foreground probability threshold in (0, 1); default: the segmenter "
            "bundle's."),
    ) -> JSONResponse:
        t0 = time.perf_counter()
        check_query(request, PREDICT_QUERY)
        data = await self._read_image_bytes(request)
        t1 = time.perf_counter()
        # Pillow walks a header's chunks in Python: off the event loop, as decoding is
        pixels = await asyncio.to_thread(self._budgeted_pixels, data)
        async with self.pixels.hold(pixels):
            t_wait = time.perf_counter()
            image, orientation = await asyncio.to_thread(self._decode, data)
            del data
            t2 = time.perf_counter()
            seg = await self._call("Segmenter", self.segmenter.segment.remote(image, threshold))
            t3 = time.perf_counter()
            cls = await self._call("Classifier",
                                   self.classifier.classify.remote(image, seg["mask"]))
            t4 = time.perf_counter()
            versions = {"segmenter": seg["version"], "classifier": cls["version"]}
            self.readiness.observe(versions)
            fmt = mask_format or MaskFormat(self.settings.default_mask_format)
            timings = {"read_ms": _ms(t0, t1), "pixel_wait_ms": _ms(t1, t_wait),
                       "decode_ms": _ms(t_wait, t2),
                       "segment_ms": _ms(t2, t3), "classify_ms": _ms(t3, t4),
                       "segment_replica_ms": seg["replica_ms"],
                       "segment_model_ms": seg["model_ms"],
                       "classify_replica_ms": cls["replica_ms"],
                       "classify_model_ms": cls["model_ms"]}
            # the mask's encoding and the JSON (an RLE of a fragmented large mask runs to
            # millions of numbers) off the event loop, and within the image's budget
            body = await asyncio.to_thread(
                response_body, seg["mask"], cls, fmt, image.shape, threshold, versions,
                timings, t0, orientation)
        return Response(body, media_type="application/json")

    @app.get("/healthz", summary="Ready when both model bundles are loaded",
             response_model=HealthResponse, responses={503: _NOT_READY})
    async def healthz(self) -> dict[str, Any]:
        infos = await self.readiness.infos()
        return {"status": "ok",
                "model_versions": {k: v.get("version") for k, v in infos.items()},
                "running_replicas": self.readiness.running}

    # load balancers and uptime checkers probe with HEAD; a route of its own keeps the GET's
    # operationId stable in the OpenAPI schema
    @app.head("/healthz", include_in_schema=False)
    async def healthz_head(self) -> Response:
        await self.readiness.infos()
        return Response(status_code=200)

    @app.get("/v1/models", summary="The loaded model bundles and their settings",
             response_model=ModelsResponse, responses={401: _ERRORS[401], 503: _NOT_READY},
             dependencies=[Depends(require_token)])
    async def models(self) -> dict[str, Any]:
        # asked afresh (batching is live-updatable), unlike /healthz
        return await self.readiness.infos(refresh=True)


def check_deployable(settings: AppArgs) -> None:
    """What the replicas would fail on, checked where Serve builds the application: a bad
    `args` raises there and the running version keeps serving, while a replica that cannot
    start made Serve stop the running ones (a missing, half-written or garbled bundle, one of
    the other task, a missing token file). Object-store credentials are the replicas' own: a
    bundle this process may not read is left to them."""
    for name, task in (("segmenter", SegmenterDeployment.func_or_class.task),
                       ("classifier", ClassifierDeployment.func_or_class.task)):
        uri = _bundle_location(getattr(settings, name).bundle_uri)
        setting = f"args.{name}.bundle_uri"
        options = settings.storage.options_for(uri) or None
        try:
            check_bundle_task(uri, task, setting, options)
            load_bundle(uri, storage_options=options)  # the weights too: garbled ones fail here
        except Exception as exc:
            if any(t.__name__ in ("NoCredentialsError", "PermissionError")
                   for t in type(exc).__mro__):
                logger.warning("%s: %s not checked here (%s); the replicas load it with their "
                               "own credentials", setting, uri, type(exc).__name__)
                continue
            raise ValueError(str(exc) if str(exc).startswith(setting)
                             else f"{setting}: {exc}") from None
    auth = settings.auth
    if auth.token_file and not os.path.isfile(auth.token_file):
        # (whether a token is set at all is the Ingress's to say: the variable may be set only
        # in its nodes' environment)
        raise ValueError(f"args.auth.token_file: {auth.token_file} is not a file")


def build_app(args: dict[str, Any]) -> Application:
    """Application builder for `serve run` / `serve deploy` (`import_path:
    serving.app:build_app`); `args` is the config's `args` mapping (see `AppArgs`)."""
    settings = AppArgs.model_validate(args)
    check_deployable(settings)
    plain = settings.model_dump(mode="json")
    segmenter = SegmenterDeployment.bind(plain["segmenter"], plain["storage"])
    classifier = ClassifierDeployment.bind(plain["classifier"], plain["storage"])
    return Ingress.bind(segmenter, classifier, plain)
