"""Settings and wire formats of the medseg Serve app (pydantic models, no Ray imports).

Settings arrive from `serving/config.yaml`: the application's `args` validate as `AppArgs`
(passed by Serve to `serving.app:build_app`), each model deployment's `user_config` as
`BatchingConfig`. Response models document the HTTP API in FastAPI's OpenAPI schema.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from medseg_core.io import MAX_TILE_WORK_PIXELS, PILLOW_MAX_PIXELS, check_url_credentials
from medseg_core.precision import check_device

IMAGE_CONTENT_TYPES = ("image/png", "image/jpeg", "image/bmp", "image/tiff")


class _Strict(BaseModel):
    # a refused URL may hold a password: settings errors do not repeat the value given
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)


# --------------------------------------------------------------------------------- settings


class ModelArgs(_Strict):
    """One model deployment: which bundle, where it runs, how it predicts."""

    bundle_uri: str = Field(description="Bundle directory: local path, file:// or s3:// URL.")
    device: str = Field(
        "auto",
        description="'auto' (CUDA when Ray assigned this replica a GPU, else CPU), 'cpu', "
        "'cuda' or 'cuda:N'. Ask for a GPU with ray_actor_options.num_gpus.",
    )
    inference_batch_size: int = Field(
        16, ge=1, description="Images (or tiles) per forward pass inside one Serve batch."
    )
    amp: bool | None = Field(
        None, description="bf16 autocast; null = on for CUDA, off on CPU; true = also on a CPU "
                          "with native bf16 (AVX512-BF16 or AMX), float32 with a warning elsewhere."
    )
    torch_threads: int | None = Field(
        None, ge=1, description="torch.set_num_threads in the replica; null leaves Ray's default."
    )
    warmup: bool = Field(True, description="Run one dummy prediction before taking traffic.")

    @field_validator("bundle_uri")
    @classmethod
    def _no_credentials(cls, v: str) -> str:
        check_url_credentials(v, "bundle_uri")  # /v1/models lists it
        return v

    @field_validator("device")
    @classmethod
    def _a_device(cls, v: str) -> str:
        return check_device(v, "device")  # a misspelt one failed only in the replica


class SegmenterArgs(ModelArgs):
    """The segmenter deployment: a model deployment that may run over tiles."""

    max_work_pixels: int | None = Field(
        MAX_TILE_WORK_PIXELS, ge=1,
        description="Tile mode: 413 for an image whose tiles hold more pixels than this (a thin "
        "1 x N image is about N / tile width whole tiles); null: no limit.",
    )


class StorageArgs(_Strict):
    """Object-store settings. Credentials never live here: they come from the environment
    (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS profiles, instance roles)."""

    endpoint_url: str | None = Field(
        None,
        description="S3-compatible endpoint, e.g. http://127.0.0.1:8333; null = AWS's default "
        "or $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL.",
    )
    region: str | None = Field(None, description="Region name; null = the environment's.")

    @field_validator("endpoint_url")
    @classmethod
    def _no_credentials(cls, v: str | None) -> str | None:
        if v is not None:
            check_url_credentials(v, "endpoint_url")
        return v

    def options_for(self, uri: str) -> dict[str, Any]:
        """fsspec storage_options for `uri` (endpoint and region only, for s3:// URLs)."""
        if not uri.startswith(("s3://", "s3a://")):
            return {}
        client_kwargs: dict[str, Any] = {}
        if self.endpoint_url:
            client_kwargs["endpoint_url"] = self.endpoint_url
        if self.region:
            client_kwargs["region_name"] = self.region
        return {"client_kwargs": client_kwargs} if client_kwargs else {}


class LimitsArgs(_Strict):
    """Request limits enforced by the ingress before anything reaches a model."""

    max_body_bytes: int = Field(
        20_000_000, ge=1, description="Largest request body (raw image or whole multipart body)."
    )
    max_pixels: int = Field(
        40_000_000, ge=1, le=PILLOW_MAX_PIXELS,
        description="Largest width * height, checked from the image header (Pillow refuses "
        f"more than {PILLOW_MAX_PIXELS} itself).",
    )
    content_types: list[str] = Field(
        default_factory=lambda: list(IMAGE_CONTENT_TYPES),
        description="Accepted raw-body media types (multipart/form-data is always accepted).",
    )
    max_inflight_pixels: int = Field(
        160_000_000, ge=1,
        description="Pixels of images one ingress replica holds at once, over all its requests "
        "in flight (each is decoded, sent to the models and its mask encoded); at least "
        "max_pixels. A request whose image does not fit waits up to pixel_wait_s, then 503.",
    )
    pixel_wait_s: float = Field(
        10.0, gt=0, allow_inf_nan=False, description="How long a request waits for its pixels before a 503."
    )
    body_idle_timeout_s: float = Field(
        10.0, gt=0, allow_inf_nan=False,
        description="Longest pause while a request's body streams in, then 408: a client that "
        "stalls mid-upload holds an ingress slot (max_ongoing_requests) until then.",
    )

    @model_validator(mode="after")
    def _budget_holds_one_image(self) -> LimitsArgs:
        if self.max_inflight_pixels < self.max_pixels:
            raise ValueError(f"max_inflight_pixels ({self.max_inflight_pixels}) must be at least "
                             f"max_pixels ({self.max_pixels}), or the largest images never fit")
        return self

    @field_validator("content_types")
    @classmethod
    def _lower(cls, v: list[str]) -> list[str]:
        unknown = sorted(set(t.lower() for t in v) - set(IMAGE_CONTENT_TYPES))
        if unknown:
            raise ValueError(f"unsupported content types {unknown}; allowed: {IMAGE_CONTENT_TYPES}")
        return [t.lower() for t in v]


class AuthArgs(_Strict):
    """Optional bearer-token auth: on when the environment variable `token_env` is non-empty."""

    token_env: str | None = Field(
        "MEDSEG_API_TOKEN",
        description="Name of the environment variable holding the token; null: none.",
    )
    token_file: str | None = Field(
        None,
        description="File holding the token (a mounted secret), read when the variable is unset "
        "or empty; surrounding whitespace is ignored. null: none.",
    )
    required: bool = Field(
        False, description="Refuse to start without a token (fail closed)."
    )

    @model_validator(mode="after")
    def _source_when_required(self) -> AuthArgs:
        if self.required and not (self.token_env or self.token_file):
            raise ValueError("auth.required needs auth.token_env or auth.token_file")
        return self


class AppArgs(_Strict):
    """`args` of the Serve application (`import_path: serving.app:build_app`)."""

    segmenter: SegmenterArgs
    classifier: ModelArgs
    storage: StorageArgs = Field(default_factory=StorageArgs)
    limits: LimitsArgs = Field(default_factory=LimitsArgs)
    auth: AuthArgs = Field(default_factory=AuthArgs)
    default_mask_format: Literal["png", "rle"] = "png"
    health_timeout_s: float = Field(
        2.0, gt=0, allow_inf_nan=False, description="How long /healthz and /v1/models wait for each model deployment."
    )
    model_timeout_s: float = Field(
        45.0, gt=0, allow_inf_nan=False,
        description="Longest wait for a model deployment's answer to one request, queueing "
        "included; then 503 `timeout` with Retry-After, and /healthz asks the models again. "
        "Keep it below http_options.request_timeout_s (Serve's own plain-text 408).",
    )


class BatchingConfig(_Strict):
    """`user_config` of a model deployment (live-updatable without restarting replicas)."""

    max_batch_size: int = Field(8, ge=1, description="Requests per @serve.batch call.")
    batch_wait_timeout_s: float = Field(
        0.002, ge=0, allow_inf_nan=False, description="Longest wait for a batch to fill after its first request."
    )


# ------------------------------------------------------------------------------ wire formats


class MaskFormat(str, Enum):
    png = "png"
    rle = "rle"


class MaskPNG(BaseModel):
    format: Literal["png"] = "png"
    size: list[int] = Field(description="[height, width], the input image's size.")
    data: str = Field(description="Base64 of an 8-bit grey PNG, 255 = lesion, 0 = background.")


class MaskRLE(BaseModel):
    format: Literal["rle"] = "rle"
    size: list[int] = Field(description="[height, width], the input image's size.")
    counts: list[int] = Field(
        description="COCO uncompressed RLE: column-major run lengths, starting with background."
    )


class PredictResponse(BaseModel):
    label: int = Field(description="Index of the most probable class.")
    label_name: str | None = Field(description="Name of that class.")
    probabilities: dict[str, float] = Field(description="Softmax probability per class name.")
    mask: MaskPNG | MaskRLE = Field(discriminator="format")
    lesion_area_fraction: float = Field(description="Lesion pixels / all pixels.")
    bbox: list[int] | None = Field(
        description="[x0, y0, x1, y1] of the lesion (x1, y1 exclusive), null when empty."
    )
    image_size: list[int] = Field(description="[height, width] of the decoded image.")
    exif_orientation: int | None = Field(
        None, description="The image's EXIF orientation tag (2-8: viewers show it turned or "
        "mirrored), which is not applied: the mask, bbox and image_size are in the stored "
        "pixel order. null: no such tag (or 1).")
    threshold: float | None = Field(description="Threshold requested (null: the bundle's).")
    model_versions: dict[str, str | None] = Field(description="Bundle version per model.")
    timings: dict[str, float] = Field(description="Milliseconds per stage.")


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class ModelInfo(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    uri: str
    version: str | None
    task: str | None
    model: dict[str, Any]
    input_size: list[int] | None
    in_channels: int | None
    threshold: float | None
    class_names: list[str] | None
    lesion_free_classes: list[str] = Field(
        default_factory=list, description="classifier: an image classified as one of these "
        "gets an empty mask (chosen on validation when the bundle was trained)")
    inference: dict[str, Any] | None
    device: str
    precision: Literal["float32", "bfloat16"] = Field(
        description="what the model computes in: bfloat16 where `amp` asked for it and the "
                    "device computes it natively")
    torch_threads: int
    batching: dict[str, Any]
    batching_error: str | None = Field(
        None, description="why the deployment's last user_config was refused (the batching "
                          "above stayed); null when it was applied")


class ModelsResponse(BaseModel):
    segmenter: ModelInfo
    classifier: ModelInfo


class HealthResponse(BaseModel):
    status: Literal["ok"]
    model_versions: dict[str, str | None]
    running_replicas: dict[str, int] | None = Field(
        None, description="RUNNING replicas of each model deployment as Serve's controller "
        "last reported them (asked at most every 5 s once ready; null before the first answer)."
        " A deployment with none makes /healthz answer 503.")
