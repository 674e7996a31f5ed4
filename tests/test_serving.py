"""The Ray Serve endpoint (serving/app.py), over real HTTP on 127.0.0.1.

One application is deployed for the module through the same path as `serve run
serving/config.yaml` (the committed config, with bundle URIs, limits, auth and resources
patched for the test): the segmenter bundle is read from the SeaweedFS S3 server (credentials
from the replicas' environment, endpoint from the config), the classifier bundle from a local
path. Responses are compared with `inference.Chain` run in-process on the same bundles."""

from __future__ import annotations

import base64
import io
import json
import socket
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
import torch.nn.functional as F
from PIL import Image

from medseg_core.checkpoint import load_bundle, make_bundle_config, save_bundle
from medseg_core.inference import Chain, Classifier, Segmenter
from medseg_core.io import decode_image, decode_mask, rle_decode
from medseg_core.layouts import list_records, load_record
from medseg_core.models import build_model
from medseg_core.transforms import normalize_batch, resize_image, resize_mask

pytestmark = [pytest.mark.ray, pytest.mark.s3]

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "test-token-0123456789"
TOKEN_ENV = "MEDSEG_TEST_API_TOKEN"
MAX_BODY = 300_000
MAX_PIXELS = 250_000
CLASS_NAMES = ["normal", "benign", "malignant"]
MEAN, STD = [0.5], [0.25]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_bytes(image: np.ndarray | Image.Image, **save) -> bytes:
    im = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buf = io.BytesIO()
    im.save(buf, format=save.pop("format", "PNG"), **save)
    return buf.getvalue()


def _train(model: torch.nn.Module, step, steps: int) -> None:
    # One thread: on a small shared machine torch's default pool mostly spins (8x slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        opt = torch.optim.Adam(model.parameters(), lr=2e-2)
        model.train()
        for _ in range(steps):
            opt.zero_grad()
            step(model).backward()
            opt.step()
        model.eval()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def samples(synthetic_archive) -> list[dict]:
    listing = list_records(synthetic_archive, "busi")
    return [load_record(r, channels=1) for r in listing.records]


@pytest.fixture(scope="module")
def bundles(samples, tmp_path_factory, s3) -> dict[str, str]:
    """A tiny U-Net (grey input, 64x64) and classifier (RGB, 32x32) trained for a few steps, so
    masks are confident rather than hovering at the threshold; the segmenter also on S3."""
    root = tmp_path_factory.mktemp("bundles")
    images = np.stack([s["image"] for s in samples])             # (N, 64, 64, 1)
    masks = torch.from_numpy(np.stack([s["mask"] for s in samples])[:, None].astype(np.float32))
    labels = torch.tensor([s["label"] for s in samples])

    seg_cfg = {"name": "unet", "in_channels": 1, "out_channels": 1, "widths": [8, 16, 32]}
    seg = build_model(seg_cfg)
    x = normalize_batch(torch.from_numpy(images), MEAN, STD)
    _train(seg, lambda m: F.binary_cross_entropy_with_logits(m(x), masks), 15)
    seg_dir = save_bundle(str(root / "segmenter"), seg, make_bundle_config(
        seg_cfg, task="segmentation", input_size=[64, 64], mean=MEAN, std=STD, threshold=0.5,
        class_names=CLASS_NAMES), version="seg-test-1")

    cls_cfg = {"name": "classifier", "in_channels": 3, "num_classes": 3, "widths": [8, 16]}
    clf = build_model(cls_cfg)
    small = np.stack([np.repeat(resize_image(im, (32, 32)), 3, axis=2) for im in images])
    small_masks = torch.from_numpy(np.stack(
        [resize_mask(s["mask"], (32, 32)) for s in samples])[:, None].astype(np.float32))
    xc = normalize_batch(torch.from_numpy(small), MEAN * 3, STD * 3)
    _train(clf, lambda m: F.cross_entropy(m(xc, small_masks), labels), 10)
    cls_dir = save_bundle(str(root / "classifier"), clf, make_bundle_config(
        cls_cfg, task="classification", input_size=[32, 32], mean=MEAN * 3, std=STD * 3,
        threshold=None, class_names=CLASS_NAMES), version="cls-test-1")

    s3_uri = "s3://medseg-serving/bundles/segmenter"
    s3.upload_dir(seg_dir, s3_uri)
    return {"segmenter": seg_dir, "classifier": cls_dir, "segmenter_s3": s3_uri}


@pytest.fixture(scope="module")
def chain(bundles) -> Chain:
    """The in-process reference on the same bundles."""
    return Chain(Segmenter(load_bundle(bundles["segmenter"])),
                 Classifier(load_bundle(bundles["classifier"])))


# Handles push their autoscaling metrics every 10 s by default; 0.5 s lets a scale-out show
# within seconds of load in the test (the Ingress's handle to the Segmenter pushes them).
METRIC_PUSH_ENV = {"RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5"}


BODY_IDLE_TIMEOUT_S = 2.0


def app_config(bundles: dict[str, str], s3, port: int,
               segmenter_autoscaling: dict | None = None) -> dict:
    """serving/config.yaml as `serve run` reads it, patched for the test: bundle URIs, limits,
    auth, small resources, one replica of each deployment unless `segmenter_autoscaling`."""
    from serving.launch import load_config, merge, patch_deployment

    config = load_config()
    config["http_options"] = {**config.get("http_options", {}), "host": "127.0.0.1", "port": port}
    app = config["applications"][0]
    app["args"] = merge(app["args"], {
        "segmenter": {"bundle_uri": bundles["segmenter_s3"], "inference_batch_size": 8},
        "classifier": {"bundle_uri": bundles["classifier"]},
        "storage": {"endpoint_url": s3.endpoint},
        "limits": {"max_body_bytes": MAX_BODY, "max_pixels": MAX_PIXELS,
                   "body_idle_timeout_s": BODY_IDLE_TIMEOUT_S},
        "auth": {"token_env": TOKEN_ENV, "required": True},
    })
    # Credentials (and the token) reach the replicas through their environment only; the
    # endpoint comes from the config, so the AWS_ENDPOINT_URL* variables are left out.
    env = {k: v for k, v in s3.env.items() if not k.startswith("AWS_ENDPOINT_URL")}
    app["runtime_env"] = {"env_vars": {**env, **METRIC_PUSH_ENV, TOKEN_ENV: TOKEN,
                                       "PYTHONPATH": str(ROOT)}}
    fixed = {"min_replicas": 1, "max_replicas": 1}
    patch_deployment(app, "Ingress", {"ray_actor_options": {"num_cpus": 0.1},
                                      "autoscaling_config": fixed})
    for name in ("Segmenter", "Classifier"):
        scaling = segmenter_autoscaling if name == "Segmenter" and segmenter_autoscaling else fixed
        patch_deployment(app, name, {"ray_actor_options": {"num_cpus": 0.2},
                                     "autoscaling_config": scaling})
    return config


@pytest.fixture(scope="module")
def server(ray_cluster, bundles, s3) -> str:
    from ray import serve

    from serving.launch import deploy

    config = app_config(bundles, s3, free_port())
    # the address Serve listens on: the config's, or that of a Serve instance already running
    url = deploy(config, timeout_s=300)
    yield url
    serve.delete(config["applications"][0]["name"])


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def post(url: str, data: bytes | None, content_type: str | None = "image/png",
         headers: dict | None = None, params: dict | None = None, **kw) -> requests.Response:
    h = dict(AUTH)
    if content_type is not None:
        h["Content-Type"] = content_type
    h.update(headers or {})
    return requests.post(f"{url}/v1/predict", data=data, headers=h, params=params, timeout=60,
                         **kw)


def check_equal(body: dict, ref: dict, image: np.ndarray) -> None:
    assert body["label"] == ref["label"]
    assert body["label_name"] == ref["label_name"]
    assert body["probabilities"].keys() == ref["probabilities"].keys()
    for name, p in ref["probabilities"].items():
        assert body["probabilities"][name] == pytest.approx(p, abs=1e-5)
    mask = body["mask"]
    assert mask["size"] == list(image.shape[:2])
    if mask["format"] == "png":
        got = decode_mask(base64.b64decode(mask["data"]))
    else:
        got = rle_decode(mask)
    assert got.shape == ref["mask"].shape == image.shape[:2]
    np.testing.assert_array_equal(got, ref["mask"])
    assert body["lesion_area_fraction"] == pytest.approx(ref["lesion_area_fraction"], abs=1e-9)
    assert body["bbox"] == ref["bbox"]
    assert body["image_size"] == list(image.shape[:2])
    assert body["model_versions"] == {"segmenter": "seg-test-1", "classifier": "cls-test-1"}
    t = body["timings"]
    assert set(t) >= {"pixel_wait_ms", "decode_ms", "segment_ms", "classify_ms", "total_ms"}
    assert 0 <= t["pixel_wait_ms"] <= t["total_ms"]
    # each hop as the Ingress saw it contains the time in the replica, which contains the model's
    for hop in ("segment", "classify"):
        assert 0 < t[f"{hop}_model_ms"] <= t[f"{hop}_replica_ms"] <= t[f"{hop}_ms"]


# ------------------------------------------------------------------------------ no server


def test_config_validates_against_serve_schema(bundles):
    from ray.serve.schema import ServeDeploySchema

    from serving.app import ClassifierDeployment, Ingress, SegmenterDeployment, build_app
    from serving.launch import load_config
    from serving.schemas import AppArgs, BatchingConfig

    config = load_config()
    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    assert app.import_path == "serving.app:build_app"
    AppArgs.model_validate(app.args)
    names = {d.name for d in app.deployments}
    assert names == {Ingress.name, SegmenterDeployment.name, ClassifierDeployment.name}
    for d in app.deployments:
        auto = d.autoscaling_config
        auto = auto if isinstance(auto, dict) else auto.model_dump()
        assert {"min_replicas", "max_replicas", "target_ongoing_requests",
                "upscale_delay_s", "downscale_delay_s"} <= set(auto)
        assert "num_gpus" in d.ray_actor_options.model_dump(exclude_unset=True)
        # a bounded queue at every caller: Serve answers 503 instead of piling up requests
        assert d.max_queued_requests >= 1
        if d.name != Ingress.name:
            batching = BatchingConfig.model_validate(d.user_config)
            assert d.max_ongoing_requests >= batching.max_batch_size
    # the builder Serve calls with `args` gives the three deployments
    args = {**app.args, "segmenter": {"bundle_uri": bundles["segmenter"]},
            "classifier": {"bundle_uri": bundles["classifier"]}}
    assert build_app(args) is not None
    with pytest.raises(ValueError):
        build_app({"segmenter": {"bundle_uri": "x"}})  # no classifier
    with pytest.raises(ValueError):
        build_app({**app.args, "limits": {"max_pixels": 0}})
    with pytest.raises(ValueError, match="max_inflight_pixels"):
        build_app({**app.args, "limits": {"max_pixels": 1000, "max_inflight_pixels": 999}})


def test_what_replicas_would_fail_on_is_refused_where_the_app_is_built(bundles, tmp_path,
                                                                      caplog):
    """Serve stopped the running replicas of a redeploy whose new ones could not start (a
    missing, garbled or swapped bundle, a missing token file), and the endpoint answered
    nothing until a good config came; `build_app` raising keeps the running version. A bad
    user_config is refused by the replica, which keeps its batching and says so."""
    import asyncio
    import logging
    import shutil

    from serving.app import SegmenterDeployment, build_app

    good = {"segmenter": {"bundle_uri": bundles["segmenter"]},
            "classifier": {"bundle_uri": bundles["classifier"]}}
    garbled = tmp_path / "garbled"
    shutil.copytree(bundles["segmenter"], garbled)
    weights = garbled / "weights.pt"
    weights.write_bytes(weights.read_bytes()[:200])
    for patch, message in (
            ({"segmenter": {"bundle_uri": str(tmp_path / "missing")}},
             r"args.segmenter.bundle_uri: .*does not exist"),
            ({"segmenter": {"bundle_uri": str(garbled)}}, r"args.segmenter.bundle_uri: "),
            ({"classifier": {"bundle_uri": bundles["segmenter"]}},
             r"args.classifier.bundle_uri: .*is a 'segmentation' bundle"),
            ({"auth": {"token_file": str(tmp_path / "no-token")}},
             r"args.auth.token_file: .*no-token is not a file")):
        with pytest.raises(ValueError, match=message):
            build_app({**good, **patch})

    async def reconfigure() -> tuple[dict, ...]:
        replica = SegmenterDeployment.func_or_class(
            {"bundle_uri": bundles["segmenter"], "warmup": False})
        replica.reconfigure({"max_batch_size": 4, "batch_wait_timeout_s": 0.01})
        before = replica.info()
        with caplog.at_level(logging.ERROR, logger="ray.serve"):
            replica.reconfigure({"max_batch_size": 0})
        return before, replica.info()

    import ray

    started = ray.is_initialized()
    before, after = asyncio.run(reconfigure())
    assert ray.is_initialized() == started  # device "auto" outside Ray started an instance
    assert before["batching"] == after["batching"] == {"max_batch_size": 4,
                                                       "batch_wait_timeout_s": 0.01}
    assert before["batching_error"] is None
    assert "max_batch_size" in after["batching_error"]
    assert "user_config refused, batching stays" in caplog.text


def test_a_model_call_that_does_not_answer_in_time_is_a_json_503_and_readiness_is_asked_again():
    """A deployment with no running replica (one failing to start) held every prediction until
    Serve's plain-text 408 at 60 s, while /healthz kept its cached "ok"."""
    import asyncio
    from types import SimpleNamespace

    from serving.app import Ingress, ModelReadiness
    from serving.inputs import ApiError
    from serving.schemas import AppArgs

    class Stuck:  # a DeploymentResponse whose replica never comes
        cancelled = False

        def __await__(self):
            return asyncio.sleep(3600).__await__()

        def cancel(self) -> None:
            self.cancelled = True

    settings = AppArgs.model_validate({"segmenter": {"bundle_uri": "s"},
                                       "classifier": {"bundle_uri": "c"}, "model_timeout_s": 0.2})
    ingress = SimpleNamespace(settings=settings, readiness=ModelReadiness({}, 1.0))
    ingress.readiness._infos = {"segmenter": {}, "classifier": {}}  # /healthz said ok
    stuck = Stuck()
    with pytest.raises(ApiError) as err:  # the Ingress's own method, on the state it uses
        asyncio.run(Ingress.func_or_class._call(ingress, "Segmenter", stuck))
    assert (err.value.status, err.value.code) == (503, "timeout")
    assert "Segmenter did not answer within 0.2 s" in err.value.message
    assert err.value.headers == {"Retry-After": "5"}
    assert stuck.cancelled and not ingress.readiness.ready


def test_the_pixel_budget_bounds_the_images_in_flight():
    """Requests hold their image's pixels: those that fit run at once, the others wait until
    pixels come back, or get a 503 with Retry-After; a cancelled request gives its share back."""
    import asyncio

    from serving.budget import PixelBudget
    from serving.inputs import ApiError

    async def scenario() -> None:
        budget = PixelBudget(100, wait_s=0.2)
        log: list[str] = []
        release = asyncio.Event()

        async def request(name: str, pixels: int) -> None:
            async with budget.hold(pixels):
                log.append(f"{name} in")
                await release.wait()
            log.append(f"{name} out")

        a = asyncio.create_task(request("a", 60))
        b = asyncio.create_task(request("b", 40))
        await asyncio.sleep(0.05)
        assert log == ["a in", "b in"] and budget.free == 0
        c = asyncio.create_task(request("c", 1000))  # more than the whole budget: waits for all
        await asyncio.sleep(0.05)
        assert "c in" not in log
        release.set()
        await asyncio.gather(a, b, c)
        assert log[-2:] == ["c in", "c out"] and budget.free == 100

        release.clear()
        hog = asyncio.create_task(request("hog", 100))
        await asyncio.sleep(0.01)
        with pytest.raises(ApiError) as err:
            async with budget.hold(1):
                pass
        assert (err.value.status, err.value.code) == (503, "overloaded")
        assert err.value.headers == {"Retry-After": "1"} and "needs 1" in err.value.message
        waiter = asyncio.create_task(request("gone", 50))  # the client goes away while waiting
        await asyncio.sleep(0.05)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        async with budget.hold(0):  # an image refused before decoding takes nothing
            assert budget.free == 0
        release.set()
        await hog
        assert budget.free == 100

        # a request cancelled while giving its pixels back, the budget's lock busy meanwhile
        # (a waiter being woken): the pixels still come back
        release.clear()
        leaving = asyncio.create_task(request("leaving", 100))
        await asyncio.sleep(0.01)
        async with budget._cond:
            release.set()
            await asyncio.sleep(0.01)  # `leaving` now waits for the lock to hand its share back
            leaving.cancel()
            await asyncio.sleep(0.01)
        with pytest.raises(asyncio.CancelledError):
            await leaving
        assert budget.free == 100
        async with budget.hold(100):
            pass
        with pytest.raises(ValueError):
            PixelBudget(0, 1.0)

    asyncio.run(scenario())


def test_a_body_read_times_out_on_a_pause_not_on_a_slow_steady_stream():
    import asyncio

    from serving.inputs import ApiError, read_limited

    async def stream(pauses: list[float]):
        for pause in pauses:
            await asyncio.sleep(pause)
            yield b"x" * 10

    # 1.2 s in all, no pause as long as the limit: read whole
    assert asyncio.run(read_limited(stream([0.2] * 6), 1000, idle_timeout=0.5)) == b"x" * 60
    with pytest.raises(ApiError) as stalled:
        asyncio.run(read_limited(stream([0.1, 1.0]), 1000, idle_timeout=0.5))
    assert (stalled.value.status, stalled.value.code) == (408, "request_timeout")


def test_multipart_parser_roundtrips_binary():
    from serving.inputs import ApiError, parse_multipart

    payload = bytes(range(256)) * 50 + b"\r\n--x\r\n\r\n"
    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhi\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + payload + f"\r\n--{boundary}--\r\n".encode()
    up = parse_multipart(body, f"multipart/form-data; boundary={boundary}")
    assert up.data == payload and up.content_type == "image/png" and up.filename == "a.png"
    with pytest.raises(ApiError) as err:
        parse_multipart(body, "multipart/form-data")
    assert err.value.status == 400


def _multipart(parts: list[tuple[str, bytes]], boundary: str = "b0undary") -> bytes:
    """A multipart/form-data body of (Content-Disposition parameters, content) parts."""
    out = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; {params}\r\n\r\n".encode()
                   + content + b"\r\n" for params, content in parts)
    return out + f"--{boundary}--\r\n".encode()


def test_multipart_parser_edge_cases():
    from serving.inputs import ApiError, parse_multipart

    ct = "multipart/form-data; boundary=b0undary"
    # the first part with a filename, unless a part is named file/image
    body = _multipart([('name="a"; filename="1.png"', b"one"), ('name="image"', b"two")])
    assert parse_multipart(body, ct).data == b"two"
    body = _multipart([('name="a"', b"x"), ('name="b"; filename="2.png"', b"two")])
    up = parse_multipart(body, ct)
    assert (up.data, up.filename, up.content_type) == (b"two", "2.png", "")
    # an empty `file` part (a form's unused input) before the image: the image is taken (it
    # was answered 415 "multipart file part is empty")
    body = _multipart([('name="file"; filename=""', b""), ('name="image"', b"img")])
    assert parse_multipart(body, ct).data == b"img"
    body = _multipart([('name="file"', b""), ('name="x"; filename="3.png"', b"three")])
    assert parse_multipart(body, ct).data == b"three"
    # preamble and epilogue ignored, quoted boundary, RFC 5987 filename, empty file part
    # an RFC 5987 value in a charset other than its two is ignored (punycode raised a 500)
    bad = "punycode''%61-%39%39%39%39%39%39%39%39%39%39"
    up = parse_multipart(_multipart([(f'name="file"; filename*={bad}', b"png")]),
                         f"{ct}; boundary*={bad}")
    assert up.data == b"png"
    body = b"preamble\r\n" + _multipart(
        [("name=\"file\"; filename*=UTF-8''na%C3%AFve.png", b"")], "a b") + b"epilogue"
    up = parse_multipart(body, 'multipart/form-data; boundary="a b"')
    assert (up.data, up.filename) == (b"", "na\u00efve.png")
    for name, data, header in [
        ("no file part", _multipart([('name="note"', b"hi")]), ct),
        ("wrong boundary", _multipart([('name="file"', b"x")]), ct.replace("b0", "c0")),
        ("no closing boundary", _multipart([('name="file"', b"x")])[:-14], ct),
        ("empty boundary", _multipart([('name="file"', b"x")]), "multipart/form-data; boundary="),
        ("boundary ending in a space", _multipart([('name="file"', b"x")], "ab "),
         'multipart/form-data; boundary="ab "'),
        ("header line without colon",
         b"--b0undary\r\nnot a header\r\n\r\nx\r\n--b0undary--\r\n", ct),
        ("empty body", b"", ct),
    ]:
        with pytest.raises(ApiError) as err:
            parse_multipart(data, header)
        assert (err.value.status, err.value.code) == (400, "bad_request"), name


def test_multipart_parser_allows_exactly_max_parts():
    from serving.inputs import MAX_PARTS, ApiError, parse_multipart

    ct = "multipart/form-data; boundary=b0undary"
    for preamble in (b"", b"preamble\r\n"):
        for n in (MAX_PARTS - 1, MAX_PARTS):
            body = preamble + _multipart([('name="x"', b"")] * (n - 1) + [('name="file"', b"f")])
            assert parse_multipart(body, ct).data == b"f", (preamble, n)
        body = preamble + _multipart([('name="x"', b"")] * MAX_PARTS + [('name="file"', b"f")])
        with pytest.raises(ApiError) as err:
            parse_multipart(body, ct)
        assert err.value.status == 400 and f"more than {MAX_PARTS} parts" in err.value.message


def test_multipart_parser_hostile_20mb_bodies():
    """Bodies at the default 20 MB limit that took the stdlib email parser 6-115 s: all
    rejected or parsed by bytes scans (timed by hand: tens of ms)."""
    from serving.inputs import ApiError, parse_multipart

    size = 20_000_000
    ct = "multipart/form-data; boundary=b0undary"
    with pytest.raises(ApiError) as err:
        parse_multipart(b"\n" * size, ct)
    assert err.value.status == 400 and "malformed" in err.value.message
    empty_part = b'--b0undary\r\nContent-Disposition: form-data; name="x"\r\n\r\n\r\n'
    tiny = empty_part * (size // len(empty_part) - 1) + _multipart([('name="file"', b"\x89PNG")])
    assert size * 0.99 < len(tiny) <= size
    with pytest.raises(ApiError) as err:
        parse_multipart(tiny, ct)
    assert err.value.status == 400 and "parts" in err.value.message
    # a legitimate 20 MB file made of line breaks comes back byte for byte
    payload = b"\x89PNG\r\n\x1a\n" + b"\n" * (size - 1000)
    up = parse_multipart(_multipart([('name="file"; filename="a.png"', payload)]), ct)
    assert up.data == payload and up.filename == "a.png"


def test_model_replica_death_is_a_json_503():
    """A replica dying mid-request (what the model handle raises then) is answered by the
    app's own error handler as 503 JSON with Retry-After, not as a 500."""
    import asyncio

    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from ray.serve.exceptions import BackPressureError
    from starlette.requests import Request

    from serving.app import _api_error, model_call_error

    request = Request({"type": "http", "method": "POST", "path": "/v1/predict",
                       "headers": [], "query_string": b""})
    for exc in (ActorDiedError(), ActorUnavailableError("unreachable", None), RayActorError(),
                BackPressureError(num_queued_requests=16, max_queued_requests=16)):
        response = asyncio.run(_api_error(request, model_call_error("Segmenter", exc)))
        assert response.status_code == 503, exc
        assert response.headers["retry-after"] == "1"
        assert response.headers["content-type"] == "application/json"
        error = json.loads(response.body)["error"]
        assert error["code"] in ("unavailable", "overloaded") and "Segmenter" in error["message"]
    err = model_call_error("Classifier", ValueError("bug"))
    assert (err.status, err.code) == (500, "internal_error")
    # a tile-mode segmenter refusing an image: Ray re-raises the replica's error as a subclass
    from ray.exceptions import RayTaskError

    from medseg_core.io import ImageTooLargeError

    remote = RayTaskError("segment", "traceback", ImageTooLargeError("1x9 image: too much"))
    err = model_call_error("Segmenter", remote.as_instanceof_cause())
    assert (err.status, err.code, err.message) == (413, "image_too_large", "1x9 image: too much")


def test_the_token_comes_from_the_variable_or_a_file_and_matches_as_sent(tmp_path,
                                                                        monkeypatch):
    import pydantic

    from serving.inputs import load_token, token_matches
    from serving.schemas import AuthArgs, LimitsArgs

    secret = tmp_path / "token"
    secret.write_text("from-file\n")  # as secrets are usually written
    monkeypatch.setenv("MEDSEG_T", " from-env\n")
    assert load_token("MEDSEG_T", str(secret)) == b"from-env"
    monkeypatch.setenv("MEDSEG_T", "  ")
    assert load_token("MEDSEG_T", str(secret)) == b"from-file"
    assert load_token(None, str(secret)) == b"from-file"
    assert load_token("MEDSEG_T", None) is None and load_token(None, None) is None
    # Starlette hands header values over decoded as latin-1: the client's UTF-8 bytes
    token = "pässwörd-ü"
    header_value = token.encode("utf-8").decode("latin-1")
    assert token_matches(header_value, token.encode("utf-8"))
    assert not token_matches(token, token.encode("utf-8"))
    assert not token_matches("not latin-1: 名", token.encode("utf-8"))
    with pytest.raises(pydantic.ValidationError, match="needs auth.token_env or auth.token_file"):
        AuthArgs(token_env=None, required=True)
    AuthArgs(token_env=None, token_file=str(secret), required=True)
    with pytest.raises(pydantic.ValidationError, match="less than or equal"):
        LimitsArgs(max_pixels=10**9)  # Pillow itself refuses beyond its own cap


def test_a_device_that_is_none_is_refused_where_the_app_is_built():
    """`device: bogus` passed the schema and build_app's checks and failed in each replica."""
    from pydantic import ValidationError

    from serving.schemas import ModelArgs

    for bad in ("bogus", "cuda:abc", "gpu"):
        with pytest.raises(ValidationError, match="device must be auto, cpu, cuda or cuda:N"):
            ModelArgs(bundle_uri="b", device=bad)
    assert ModelArgs(bundle_uri="b", device="cuda:1").device == "cuda:1"


def test_the_tile_work_limit_is_a_segmenter_setting_only():
    """`classifier.max_work_pixels` was accepted and did nothing: the classifier runs no tiles."""
    from pydantic import ValidationError

    from serving.schemas import AppArgs

    with pytest.raises(ValidationError, match=r"classifier\.max_work_pixels\n +Extra inputs"):
        AppArgs(segmenter={"bundle_uri": "s"},
                classifier={"bundle_uri": "c", "max_work_pixels": 1000})
    args = AppArgs(segmenter={"bundle_uri": "s", "max_work_pixels": 1000},
                   classifier={"bundle_uri": "c"})
    assert args.segmenter.max_work_pixels == 1000


def test_timeouts_and_waits_must_be_finite():
    """`body_idle_timeout_s: .inf` let a stalled upload hold its ingress slot for ever."""
    from pydantic import ValidationError

    from serving.schemas import AppArgs, BatchingConfig, LimitsArgs

    models = {"segmenter": {"bundle_uri": "s"}, "classifier": {"bundle_uri": "c"}}
    for build in (lambda: LimitsArgs(body_idle_timeout_s=float("inf")),
                  lambda: LimitsArgs(pixel_wait_s=float("inf")),
                  lambda: BatchingConfig(batch_wait_timeout_s=float("inf")),
                  lambda: AppArgs(**models, model_timeout_s=float("inf")),
                  lambda: AppArgs(**models, health_timeout_s=float("inf"))):
        with pytest.raises(ValidationError, match="finite number"):
            build()


def test_a_bundle_uri_carrying_credentials_is_refused_without_repeating_them():
    """/v1/models lists each bundle's URI and Serve logs a refused config: a password in
    either must not get there (pydantic's errors repeat the input value by default)."""
    import pydantic

    from serving.schemas import AppArgs

    for args in ({"segmenter": {"bundle_uri": "https://alice:s3cr3t@models.example/seg"},
                  "classifier": {"bundle_uri": "s3://bucket/cls@v2"}},
                 {"segmenter": {"bundle_uri": "s3://bucket/seg"},
                  "classifier": {"bundle_uri": "s3://bucket/cls"},
                  "storage": {"endpoint_url": "http://alice:s3cr3t@127.0.0.1:8333"}}):
        with pytest.raises(pydantic.ValidationError, match="the URL carries credentials") as e:
            AppArgs.model_validate(args)
        assert "s3cr3t" not in str(e.value) and "alice" not in str(e.value)
    ok = AppArgs.model_validate({"segmenter": {"bundle_uri": "s3://bucket/seg"},
                                 "classifier": {"bundle_uri": "s3://bucket/cls@v2"}})
    assert ok.classifier.bundle_uri == "s3://bucket/cls@v2"


def test_readiness_is_cached_after_both_models_answer():
    import asyncio

    from serving.app import ModelReadiness
    from serving.inputs import ApiError

    calls = {"a": 0, "b": 0}
    mode = {"b": "hang"}

    def model(name: str):
        async def info():
            calls[name] += 1
            if name == "b" and mode["b"] == "hang":   # busy or still loading
                await asyncio.sleep(10)
            return {"version": name}
        return info

    readiness = ModelReadiness({"a": model("a"), "b": model("b")}, 0.1)

    async def scenario() -> None:
        for _ in range(2):  # not ready: asked (again) every time, 503 each time
            with pytest.raises(ApiError) as err:
                await readiness.infos()
            assert err.value.status == 503 and "b (no answer" in err.value.message
        assert not readiness.ready and calls == {"a": 2, "b": 2}
        mode["b"] = "ok"
        assert await readiness.infos() == {"a": {"version": "a"}, "b": {"version": "b"}}
        mode["b"] = "hang"                            # a burst: info() would queue now
        for _ in range(3):
            assert (await readiness.infos())["b"] == {"version": "b"}
        assert readiness.ready and calls == {"a": 3, "b": 3}
        readiness.observe({"b": "b2"})                # a prediction served a swapped bundle
        assert await readiness.infos() == {"a": {"version": "a"}, "b": {"version": "b2"}}
        assert calls == {"a": 3, "b": 3}              # ... known without asking the models
        with pytest.raises(ApiError):                 # /v1/models asks afresh ...
            await readiness.infos(refresh=True)
        assert readiness.ready                        # ... without losing readiness
        readiness.reset()                             # a deployment became unavailable
        with pytest.raises(ApiError):
            await readiness.infos()

    asyncio.run(scenario())


def test_readiness_is_lost_when_serve_reports_a_model_deployment_without_running_replicas():
    """/healthz kept its cached "ok" for minutes while the segmenter, its bundle gone bad,
    failed every restart: no prediction arrived to time out and reset it."""
    import asyncio

    from serving.app import ModelReadiness
    from serving.inputs import ApiError

    running = {"a": (1, None), "b": (1, None)}
    asked = []

    async def replicas():
        asked.append(dict(running))
        return dict(running)

    async def info():
        return {"version": "v"}

    readiness = ModelReadiness({"a": info, "b": info}, 0.5, replicas, replicas_ttl_s=0.0)

    async def scenario() -> None:
        await readiness.infos()                       # ready; the controller not asked yet
        assert asked == [] and readiness.running is None
        await readiness.infos()
        assert readiness.ready and readiness.running == {"a": 1, "b": 1}
        running["b"] = (0, None)                      # scaled to zero, healthy: starts one
        await readiness.infos()                       # for the next request
        assert readiness.ready and readiness.running == {"a": 1, "b": 0}
        running["a"] = (0, "no running replica: UNHEALTHY")  # its replicas fail to start
        with pytest.raises(ApiError) as err:
            await readiness.infos()
        assert err.value.status == 503 and not readiness.ready
        assert "a (no running replica: UNHEALTHY)" in err.value.message
        running["a"] = (1, None)                      # back: ready, with a fresh count
        await readiness.infos()
        assert readiness.running is None              # not the count from before
        await readiness.infos()
        assert readiness.running == {"a": 1, "b": 0}
        assert err.value.headers == {"Retry-After": "5"}

    asyncio.run(scenario())


def test_health_gathering_reports_missing_models():
    import asyncio

    from serving.app import gather_model_infos
    from serving.inputs import ApiError

    async def ok():
        return {"version": "v"}

    async def hang():
        await asyncio.sleep(10)

    async def boom():
        raise RuntimeError("replica died")

    assert asyncio.run(gather_model_infos({"a": ok, "b": ok}, 0.5)) == {
        "a": {"version": "v"}, "b": {"version": "v"}}
    with pytest.raises(ApiError) as err:
        asyncio.run(gather_model_infos({"a": ok, "b": hang, "c": boom}, 0.2))
    assert err.value.status == 503
    assert "b (no answer" in err.value.message and "c (RuntimeError)" in err.value.message


# ------------------------------------------------------------------------------ endpoint


def test_healthz_and_models(server):
    # once ready, the running replicas come from Serve's controller (at most every 5 s)
    deadline = time.monotonic() + 30
    while True:
        r = requests.get(f"{server}/healthz", timeout=30)
        assert r.status_code == 200, r.text
        health = r.json()
        if health["running_replicas"] is not None or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert health == {"status": "ok", "running_replicas": {"segmenter": 1, "classifier": 1},
                      "model_versions": {"segmenter": "seg-test-1", "classifier": "cls-test-1"}}
    r = requests.head(f"{server}/healthz", timeout=30)
    assert (r.status_code, r.content) == (200, b"")

    r = requests.get(f"{server}/v1/models", timeout=30)
    assert r.status_code == 401
    r = requests.get(f"{server}/v1/models", headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    models = r.json()
    assert models["segmenter"]["uri"] == "s3://medseg-serving/bundles/segmenter"
    assert models["segmenter"]["version"] == "seg-test-1"
    assert models["segmenter"]["device"] == "cpu"
    assert models["segmenter"]["precision"] == models["classifier"]["precision"] == "float32"
    from serving.launch import load_config

    configured = {d["name"]: d.get("user_config") for d in
                  load_config()["applications"][0]["deployments"]}
    assert models["segmenter"]["batching"] == configured["Segmenter"]
    assert models["classifier"]["batching"] == configured["Classifier"]
    assert models["classifier"]["class_names"] == CLASS_NAMES
    assert models["classifier"]["lesion_free_classes"] == []  # a bundle that clears none
    assert models["classifier"]["input_size"] == [32, 32]

    spec = requests.get(f"{server}/openapi.json", timeout=30).json()
    assert list(spec["paths"]["/healthz"]) == ["get"]  # HEAD stays out: one stable operationId
    op = spec["paths"]["/v1/predict"]["post"]
    assert set(op["requestBody"]["content"]) == {
        "image/png", "image/jpeg", "image/bmp", "image/tiff", "multipart/form-data"}
    assert {"mask_format", "threshold"} <= {p["name"] for p in op["parameters"]}
    assert {"200", "400", "401", "408", "413", "415", "422", "500", "503"} <= set(
        op["responses"])
    assert "Retry-After" in op["responses"]["503"]["headers"]
    # as the parser takes them (the schema named `file` alone), and /healthz's own 503
    multipart = op["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert set(multipart["properties"]) == {"file", "image"}
    health_503 = spec["paths"]["/healthz"]["get"]["responses"]["503"]
    assert "no running replica" in health_503["description"]
    assert "Retry-After" in health_503["headers"]
    # the bearer scheme is declared, so that /docs can send the token
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert op["security"] == [{"HTTPBearer": []}]


def test_a_stalled_upload_gets_a_json_408_and_frees_its_slot(server, samples):
    """A client that declared a body and stalled held an Ingress slot until Serve's 60 s
    request timeout (plain text): about 100 of them made the whole endpoint answer 503."""
    import time
    from urllib.parse import urlsplit

    host, port = urlsplit(server).hostname, urlsplit(server).port
    with socket.create_connection((host, port), timeout=30) as s:
        s.sendall(f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                  "Content-Type: image/png\r\nContent-Length: 1000\r\n\r\n".encode()
                  + b"\x89PNG\r\n\x1a\n")
        started = time.monotonic()
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
        waited = time.monotonic() - started
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), head[:200]
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert BODY_IDLE_TIMEOUT_S <= waited < 30
    assert post(server, png_bytes(samples[0]["image"][:, :, 0])).status_code == 200


def test_predict_equals_in_process_chain(server, samples, chain):
    cases = [samples[0]["image"][:, :, 0], samples[7]["image"][:, :, 0],
             resize_image(samples[12]["image"], (80, 96))[:, :, 0]]   # not the model's size
    for grey in cases:
        data = png_bytes(grey)
        image = decode_image(data)
        ref = chain.predict([image])[0]
        for fmt in ("png", "rle"):
            r = post(server, data, params={"mask_format": fmt})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["mask"]["format"] == fmt
            check_equal(body, ref, image)
    # an explicit threshold is the threshold Chain.predict receives
    data = png_bytes(cases[1])
    image = decode_image(data)
    ref = chain.predict([image], threshold=0.8)[0]
    r = post(server, data, params={"threshold": 0.8})
    assert r.status_code == 200, r.text
    check_equal(r.json(), ref, image)
    assert r.json()["threshold"] == 0.8


def test_classifier_replica_passes_on_the_classes_whose_masks_the_chain_clears(bundles, samples,
                                                                               tmp_path):
    """A classifier bundle whose training chose to clear the masks of images it calls normal:
    the replica hands its `lesion_free_classes` to the Ingress, whose response then has an
    empty mask for those images (`summarize_prediction`, as in `Chain.predict`)."""
    import time

    from serving.app import ClassifierDeployment, response_body
    from serving.schemas import MaskFormat

    bundle = load_bundle(bundles["classifier"])
    uri = save_bundle(str(tmp_path / "cls"), bundle.model,
                      {**bundle.config, "lesion_free_classes": ["normal"]}, version="cls+clear")
    replica = ClassifierDeployment.func_or_class({"bundle_uri": uri, "warmup": False})
    assert replica.info()["lesion_free_classes"] == ["normal"]
    image = np.repeat(samples[0]["image"], 3, axis=2)
    labels = []
    # this classifier calls an image without a lesion normal, one that is all lesion not
    for seen in (np.zeros(image.shape[:2], np.uint8), np.ones(image.shape[:2], np.uint8)):
        (out,) = replica._classify_sync([image], [seen])
        assert out["lesion_free"] == ("normal",)
        mask = np.zeros(image.shape[:2], np.uint8)
        mask[5:9, 6:12] = 1  # what the segmenter found
        body = json.loads(response_body(mask, out, MaskFormat.rle, image.shape, None, {}, {},
                                        time.perf_counter()))
        labels.append(body["label_name"])
        cleared = body["label_name"] == "normal"
        assert int(rle_decode(body["mask"]).sum()) == (0 if cleared else 24)
        assert body["bbox"] == (None if cleared else [6, 5, 12, 9])
        assert body["lesion_area_fraction"] == (0.0 if cleared else 24 / mask.size)
    assert labels[0] == "normal" and labels[1] != "normal"  # both ways were checked


@pytest.mark.parametrize("native", [True, False])
def test_amp_true_on_a_cpu_replica_runs_bf16_where_the_cpu_has_it(bundles, fake_native_bf16,
                                                                    native):
    """`args.segmenter.amp: true` on a CPU replica: bf16 where the CPU computes it natively
    (the default U-Net ran 1.9x faster), float32 elsewhere; /v1/models says which."""
    from serving.app import ClassifierDeployment, SegmenterDeployment

    fake_native_bf16(native)
    for cls, uri in ((SegmenterDeployment, bundles["segmenter"]),
                     (ClassifierDeployment, bundles["classifier"])):
        for amp, precision in ((None, "float32"), (True, "bfloat16" if native else "float32")):
            replica = cls.func_or_class({"bundle_uri": uri, "amp": amp, "warmup": False})
            assert replica.info()["precision"] == precision, (cls, amp)


def _variants(grey: np.ndarray) -> dict[str, tuple[bytes, str]]:
    rgb = np.stack([grey, np.roll(grey, 3, axis=1), 255 - grey], axis=2)
    rgba = Image.fromarray(np.dstack([rgb, np.full_like(grey, 128)]), "RGBA")
    sixteen = Image.fromarray(grey.astype(np.uint16) * 257)          # mode I;16
    assert sixteen.mode == "I;16"
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned; taken in stored order, and the response says so
    turned = io.BytesIO()
    Image.fromarray(rgb).save(turned, "JPEG", exif=exif, quality=90)
    return {
        "exif_turned_jpeg": (turned.getvalue(), "image/jpeg"),
        "rgba_png": (png_bytes(rgba), "image/png"),
        "16bit_png": (png_bytes(sixteen), "image/png"),
        "palette_png": (png_bytes(palette), "image/png"),
        "grey_jpeg": (png_bytes(grey, format="JPEG", quality=90), "image/jpeg"),
        "rgb_bmp": (png_bytes(rgb, format="BMP"), "image/bmp"),
        "rgb_tiff": (png_bytes(rgb, format="TIFF"), "image/tiff"),
    }


def test_image_modes_and_formats_succeed(server, samples, chain):
    grey = resize_image(samples[9]["image"], (72, 60))[:, :, 0]
    for name, (data, kind) in _variants(grey).items():
        r = post(server, data, content_type=kind)
        assert r.status_code == 200, f"{name}: {r.text}"
        image = decode_image(data)
        check_equal(r.json(), chain.predict([image])[0], image)
        assert r.json()["exif_orientation"] == (6 if name.startswith("exif") else None), name


def test_multipart_and_chunked_uploads(server, samples, chain):
    data = png_bytes(samples[4]["image"][:, :, 0])
    image = decode_image(data)
    ref = chain.predict([image])[0]
    r = requests.post(f"{server}/v1/predict", headers=AUTH, timeout=60,
                      files={"file": ("scan.png", data, "image/png")})
    assert r.status_code == 200, r.text
    check_equal(r.json(), ref, image)
    # a generic part type is fine too (the bytes are sniffed)
    r = requests.post(f"{server}/v1/predict", headers=AUTH, timeout=60,
                      files={"image": ("scan.bin", data, "application/octet-stream")})
    assert r.status_code == 200, r.text
    # chunked transfer encoding (no Content-Length): streamed with the byte limit
    r = post(server, (data[i:i + 1000] for i in range(0, len(data), 1000)))
    assert r.status_code == 200, r.text
    check_equal(r.json(), ref, image)


def test_multipart_hostile_bodies_rejected(server, samples):
    """Bodies that kept the old (stdlib email) parser busy get a 400 and the replica keeps
    serving; many tiny parts and a body of line breaks, each just under the byte limit."""
    ct = {"Content-Type": "multipart/form-data; boundary=b0undary"}
    tiny = _multipart([('name="x"', b"")] * (MAX_BODY // 60) + [('name="file"', b"\x89PNG")])
    for name, body, fragment in [("tiny parts", tiny, "parts"),
                                 ("line breaks", b"\n" * (MAX_BODY - 1), "malformed")]:
        assert len(body) < MAX_BODY
        r = requests.post(f"{server}/v1/predict", data=body, headers={**AUTH, **ct}, timeout=60)
        assert r.status_code == 400, f"{name}: {r.text}"
        assert r.json()["error"]["code"] == "bad_request" and fragment in r.text, name
    data = png_bytes(samples[3]["image"][:, :, 0])
    r = requests.post(f"{server}/v1/predict", headers=AUTH, timeout=60,
                      files={"file": ("scan.png", data, "image/png")})
    assert r.status_code == 200, r.text


def test_deployed_queue_limits_match_config(server):
    """max_queued_requests reaches the running deployments from config.yaml."""
    from ray.serve.context import _get_global_client

    from serving.launch import load_config

    app = load_config()["applications"][0]
    details = _get_global_client().get_serve_details()["applications"][app["name"]]
    for entry in app["deployments"]:
        deployed = details["deployments"][entry["name"]]["deployment_config"]
        assert deployed["max_queued_requests"] == entry["max_queued_requests"]


def _huge_png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_bad_inputs_get_json_errors(server, samples):
    good = png_bytes(samples[2]["image"][:, :, 0])
    too_many_bytes = good + b"\0" * (MAX_BODY + 1 - len(good))
    many_pixels = png_bytes(np.zeros((600, 500), np.uint8))                      # 300k px, tiny file
    multipart_text = {"files": {"file": ("notes.txt", b"hello", "text/plain")}}
    multipart_none = {"files": {"note": (None, b"hello")}}
    cases = [
        # name, request kwargs, status, code, message fragment
        ("empty body", dict(data=b""), 415, "empty_body", "empty"),
        ("no content type", dict(data=good, content_type=None), 415,
         "unsupported_media_type", "missing Content-Type"),
        ("wrong content type", dict(data=good, content_type="text/plain"), 415,
         "unsupported_media_type", "'text/plain'"),
        ("json content type", dict(data=b"{}", content_type="application/json"), 415,
         "unsupported_media_type", "not accepted"),
        ("garbage bytes", dict(data=b"this is not an image at all" * 10), 400,
         "invalid_image", "not a PNG/JPEG/BMP/TIFF image"),
        ("truncated png", dict(data=good[: len(good) // 2]), 400, "invalid_image", "truncated"),
        # its message listed formats the endpoint refuses (GIF/WEBP/PPM)
        ("png signature only", dict(data=good[:8]), 400, "invalid_image",
         "request body: a PNG signature, but no readable image after it"),
        ("too many bytes", dict(data=too_many_bytes), 413, "payload_too_large",
         f"limit of {MAX_BODY} bytes"),
        ("too many bytes, chunked", dict(
            data=(too_many_bytes[i:i + 65536] for i in range(0, len(too_many_bytes), 65536))),
         413, "payload_too_large", "exceeds the limit"),
        ("too many pixels (real image)", dict(data=many_pixels), 413, "image_too_large",
         f"over the limit of {MAX_PIXELS}"),
        ("too many pixels (header only)", dict(data=_huge_png_header(100_000, 100_000)), 413,
         "image_too_large", "too large"),
        ("threshold 0", dict(data=good, params={"threshold": 0}), 422, "invalid_parameter",
         "threshold"),
        ("threshold 1", dict(data=good, params={"threshold": 1}), 422, "invalid_parameter",
         "threshold"),
        ("threshold text", dict(data=good, params={"threshold": "high"}), 422,
         "invalid_parameter", "threshold"),
        ("threshold nan", dict(data=good, params={"threshold": "nan"}), 422,
         "invalid_parameter", "finite number"),  # it said "should be less than 1"
        ("bad mask_format", dict(data=good, params={"mask_format": "jpeg"}), 422,
         "invalid_parameter", "mask_format"),
        ("misspelt parameter", dict(data=good, params={"treshold": 0.3}), 422,
         "invalid_parameter", "unknown query parameter(s) 'treshold'; accepted: mask_format"),
        ("parameter twice", dict(data=good, params=[("threshold", 0.3), ("threshold", 0.6)]),
         422, "invalid_parameter", "given more than once: threshold"),
        ("no token", dict(data=good, headers={"Authorization": ""}), 401, "unauthorized",
         "bearer token"),
        ("wrong token", dict(data=good, headers={"Authorization": "Bearer nope"}), 401,
         "unauthorized", "bearer token"),
        ("basic auth", dict(data=good, headers={"Authorization": f"Basic {TOKEN}"}), 401,
         "unauthorized", "bearer token"),
        ("no token beats bad query", dict(data=good, params={"threshold": 5},
                                          headers={"Authorization": ""}), 401, "unauthorized", ""),
    ]
    for name, kwargs, status, code, fragment in cases:
        r = post(server, **kwargs)
        assert r.status_code == status, f"{name}: {r.status_code} {r.text}"
        err = r.json()["error"]
        assert err["code"] == code, f"{name}: {err}"
        assert fragment in err["message"], f"{name}: {err}"
        if status == 401:
            assert r.headers.get("WWW-Authenticate", "").startswith("Bearer")
            assert TOKEN not in r.text
    for name, kwargs, status, code in [
        ("multipart text part", multipart_text, 415, "unsupported_media_type"),
        ("multipart without file", multipart_none, 400, "bad_request"),
    ]:
        r = requests.post(f"{server}/v1/predict", headers=AUTH, timeout=60, **kwargs)
        assert r.status_code == status, f"{name}: {r.status_code} {r.text}"
        assert r.json()["error"]["code"] == code
    r = requests.get(f"{server}/v1/predict", headers=AUTH, timeout=30)
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    r = requests.get(f"{server}/nope", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    # ... and the server keeps answering
    assert requests.get(f"{server}/healthz", timeout=30).status_code == 200
    r = post(server, good)
    assert r.status_code == 200, r.text


def test_concurrent_burst(server, samples, chain):
    """200 requests at concurrency 16 (batched in the model deployments): all succeed and
    each equals the in-process result for its image."""
    images = [resize_image(samples[i]["image"], size)[:, :, 0]
              for i, size in ((1, (64, 64)), (6, (70, 90)), (11, (64, 64)), (14, (50, 64)))]
    payloads = [png_bytes(im) for im in images]
    decoded = [decode_image(p) for p in payloads]
    refs = [chain.predict([im])[0] for im in decoded]

    import threading

    local = threading.local()

    def one(i: int) -> tuple[int, int, dict]:
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        k = i % len(payloads)
        r = session.post(f"{server}/v1/predict", data=payloads[k], timeout=120,
                         headers={**AUTH, "Content-Type": "image/png"})
        return k, r.status_code, r.json()

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(200)))
    assert [s for _, s, _ in results] == [200] * 200, [b for _, s, b in results if s != 200][:3]
    for k, _, body in results:
        check_equal(body, refs[k], decoded[k])


def _running_replicas(app: str, deployment: str) -> int:
    from ray import serve

    status = serve.status().applications[app].deployments[deployment]
    return int(status.replica_states.get("RUNNING", 0))


def test_the_segmenter_scales_out_under_load_and_back_in(server, samples, chain, bundles, s3):
    """serving/config.yaml's autoscaling at work over real HTTP: redeployed (as `serve deploy`
    of an edited config does) with the Segmenter allowed 1-2 replicas, a sustained load at
    concurrency 16 brings up the second replica, every request of it succeeds with the
    in-process chain's answer, and once the load stops the deployment scales back to one."""
    from serving.launch import deploy

    app = app_config(bundles, s3, free_port())["applications"][0]["name"]
    scaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
               "upscale_delay_s": 0, "downscale_delay_s": 1, "look_back_period_s": 2,
               "metrics_interval_s": 0.5}
    image = resize_image(samples[4]["image"], (64, 64))[:, :, 0]
    payload = png_bytes(image)
    ref = chain.predict([decode_image(payload)])[0]
    assert _running_replicas(app, "Segmenter") == 1

    import threading
    import time

    stop = threading.Event()
    local = threading.local()
    scaled_after: list[float] = []

    def load(_: int) -> list[tuple[int, dict]]:
        # bounded in count and time; ends early once the scale-out was seen
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        out, deadline = [], time.monotonic() + 90
        while not stop.is_set() and len(out) < 300 and time.monotonic() < deadline:
            r = session.post(f"{server}/v1/predict", data=payload, timeout=120,
                             headers={**AUTH, "Content-Type": "image/png"})
            out.append((r.status_code, r.json()))
        return out

    try:
        deploy(app_config(bundles, s3, free_port(), segmenter_autoscaling=scaling))
        t0 = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(load, i) for i in range(16)]
            while time.monotonic() - t0 < 90 and not all(f.done() for f in futures):
                if _running_replicas(app, "Segmenter") >= 2:
                    scaled_after.append(time.monotonic() - t0)
                    time.sleep(1.0)  # requests keep flowing while both replicas serve
                    break
                time.sleep(0.2)
            stop.set()
            results = [r for f in futures for r in f.result()]
        assert scaled_after, "the Segmenter never got a second replica under load"
        print(f"second Segmenter replica running {scaled_after[0]:.1f} s into the load; "
              f"{len(results)} requests")
        assert [s for s, _ in results] == [200] * len(results), \
            [b for s, b in results if s != 200][:3]
        for _, body in results:
            check_equal(body, ref, decode_image(payload))

        deadline = time.monotonic() + 60
        while _running_replicas(app, "Segmenter") > 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _running_replicas(app, "Segmenter") == 1, "no scale-in after the load stopped"
        print(f"back to one replica {60 - (deadline - time.monotonic()):.1f} s after the load")
        r = post(server, payload)
        assert r.status_code == 200, r.text
    finally:
        stop.set()
        deploy(app_config(bundles, s3, free_port()))  # the module's one-replica setup again
