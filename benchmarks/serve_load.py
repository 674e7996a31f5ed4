"""Load benchmark of the Serve endpoint (not a test).

Deploys `serving/config.yaml` (bundle URIs and replica counts patched) on a local Ray cluster and
sends a bounded number of real HTTP requests with a 256x256 PNG at several concurrencies, with
the config's batching and with batching switched off (max_batch_size=1, applied live through
the deployments' user_config). Batched and unbatched runs alternate level by level, so drift in
the machine's load hits both alike. The last line is

    RESULT serve_overhead_p50=<HTTP p50 / in-process Chain p50, one request at a time>
           serve_batching_gain=<batched req/s / unbatched req/s at concurrency 16>

The gain is taken from extra rounds at concurrency 16 that alternate batched and unbatched
(total requests / total time per mode), the table's rows being single runs.

The overhead is measured in interleaved pairs (one in-process `Chain.predict`, one HTTP request,
repeated) on the same image and bundles, with the in-process Chain using as many torch threads
as a model replica gets (Ray gives an actor `num_cpus` threads, at least one), so it measures
what serving adds rather than a difference in compute.

    python3 scripts/dev.py bench serve_load                  # untrained bundles, default models
    python3 scripts/dev.py bench serve_load --segmenter s3://b/seg --classifier s3://b/cls
    python3 scripts/dev.py bench serve_load --model-gpus 0.5 --model-cpus 2   # one GPU, shared
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import aiohttp  # noqa: E402
import numpy as np  # noqa: E402
import requests  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from medseg_core.checkpoint import load_bundle, make_bundle_config, save_bundle  # noqa: E402
from medseg_core.inference import Chain, Classifier, Segmenter  # noqa: E402
from medseg_core.io import decode_image, encode_png  # noqa: E402
from medseg_core.models import build_model  # noqa: E402
from medseg_core.synthetic import make_sample  # noqa: E402
from pipelines.train import classifier_model  # noqa: E402

MODELS = ("Segmenter", "Classifier")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--segmenter", help="segmenter bundle URI (default: untrained, default model)")
    p.add_argument("--classifier", help="classifier bundle URI (default: untrained, default model)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--input-size", type=int, default=256, help="input size of generated bundles")
    p.add_argument("--concurrency", default="1,8,16,32")
    p.add_argument("--requests", default="16,32,48,48",
                   help="requests per concurrency level (same order)")
    p.add_argument("--gain-rounds", type=int, default=3,
                   help="alternating batched/unbatched rounds at concurrency 16 for the gain")
    p.add_argument("--gain-requests", type=int, default=32, help="requests per gain round")
    p.add_argument("--pairs", type=int, default=16,
                   help="interleaved in-process / HTTP pairs for the overhead ratio")
    p.add_argument("--max-batch-size", type=int, default=None,
                   help="batched run's max_batch_size (default: serving/config.yaml)")
    p.add_argument("--batch-wait", type=float, default=None,
                   help="batched run's batch_wait_timeout_s (default: serving/config.yaml)")
    p.add_argument("--inference-batch-size", type=int, default=None,
                   help="images per forward pass inside a Serve batch (default: config)")
    p.add_argument("--amp", action="store_true",
                   help="bf16 autocast in both model deployments (args.amp=true) and in the "
                        "in-process Chain: on CPUs with native bf16, see README")
    p.add_argument("--model-cpus", type=float, default=1.0,
                   help="num_cpus (and so torch threads) of each model replica")
    p.add_argument("--model-gpus", type=float, default=0.0,
                   help="num_gpus of each model replica (0.5: both models share one GPU); the "
                        "in-process Chain then runs on cuda too")
    p.add_argument("--ingress-replicas", type=int, default=1,
                   help="Ingress replicas (HTTP decode/encode; one is the bottleneck on a GPU)")
    p.add_argument("--num-cpus", type=int, default=4,
                   help="Ray's logical CPUs (bookkeeping only: room for the replicas asked for)")
    return p.parse_args()


def make_bundles(root: Path, input_size: int) -> tuple[str, str]:
    """Untrained bundles with the project's default architectures (pipelines/conf)."""
    conf = ROOT / "pipelines" / "conf"
    seg_cfg = yaml.safe_load((conf / "model" / "unet.yaml").read_text())
    data = yaml.safe_load((conf / "data" / "synthetic.yaml").read_text())
    cls_cfg = classifier_model(yaml.safe_load((conf / "classifier" / "cnn.yaml").read_text()),
                               data["class_names"])
    torch.manual_seed(0)
    common = dict(input_size=[input_size, input_size], mean=data["mean"], std=data["std"],
                  class_names=data["class_names"])
    seg = save_bundle(str(root / "segmenter"), build_model(seg_cfg), make_bundle_config(
        seg_cfg, task="segmentation", threshold=0.5, **common), version="bench-seg")
    cls = save_bundle(str(root / "classifier"), build_model(cls_cfg), make_bundle_config(
        cls_cfg, task="classification", threshold=None, **common), version="bench-cls")
    return seg, cls


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def load(url: str, payload: bytes, concurrency: int, n: int) -> dict[str, Any]:
    """`n` POSTs, at most `concurrency` in flight; latencies in ms."""
    latencies: list[float] = []
    server: list[dict[str, float]] = []
    errors = 0
    queue = iter(range(n))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:

        async def worker() -> None:
            nonlocal errors
            for _ in queue:
                t = time.perf_counter()
                async with s.post(url, data=payload, headers={"Content-Type": "image/png"}) as r:
                    body = await r.json()
                latencies.append((time.perf_counter() - t) * 1000)
                if r.status != 200:
                    errors += 1
                else:
                    server.append(body["timings"])

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    q = np.percentile(np.asarray(latencies), [50, 95, 99])
    return {"n": n, "errors": errors, "rps": n / wall, "p50": q[0], "p95": q[1], "p99": q[2],
            "server": {k: statistics.median(t[k] for t in server) for k in server[0]}
            if server else {}}


def paired_overhead(chain: Chain, image: np.ndarray, url: str, payload: bytes, pairs: int,
                    threads: int) -> tuple[float, float]:
    """Median in-process Chain.predict and median HTTP latency (ms), measured alternately."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    session = requests.Session()
    local, remote = [], []
    try:
        for i in range(pairs + 3):
            t = time.perf_counter()
            chain.predict([image])
            t1 = time.perf_counter()
            r = session.post(url, data=payload, headers={"Content-Type": "image/png"}, timeout=60)
            t2 = time.perf_counter()
            r.raise_for_status()
            if i >= 3:  # warm-up pairs
                local.append((t1 - t) * 1000)
                remote.append((t2 - t1) * 1000)
    finally:
        torch.set_num_threads(before)
    return statistics.median(local), statistics.median(remote)


def main() -> None:
    args = parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    counts = [int(n) for n in args.requests.split(",")]
    if len(levels) != len(counts) or 16 not in levels:
        raise SystemExit("--concurrency and --requests need the same length and level 16")

    import ray
    from ray import serve

    from serving.launch import deploy, load_config, merge, patch_deployment

    seg_uri, cls_uri = args.segmenter, args.classifier
    if not (seg_uri and cls_uri):
        seg_uri, cls_uri = make_bundles(Path(tempfile.mkdtemp(prefix="medseg-bench-")),
                                        args.input_size)
    grey, _ = make_sample("benign", args.image_size, np.random.default_rng(0))
    payload = encode_png(grey)
    image = decode_image(payload, keep_grey=True)  # as the server decodes it

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    port = free_port()
    config = load_config()
    config["http_options"] = {**config.get("http_options", {}), "host": "127.0.0.1",
                              "port": port}
    app = config["applications"][0]
    model_args: dict[str, Any] = {}
    if args.inference_batch_size is not None:
        model_args["inference_batch_size"] = args.inference_batch_size
    if args.amp:
        model_args["amp"] = True
    app["args"] = merge(app["args"], {"segmenter": {"bundle_uri": seg_uri, **model_args},
                                      "classifier": {"bundle_uri": cls_uri, **model_args},
                                      "auth": {"token_env": None}})
    fixed = {"min_replicas": 1, "max_replicas": 1}
    patch_deployment(app, "Ingress", {"autoscaling_config": {
        "min_replicas": args.ingress_replicas, "max_replicas": args.ingress_replicas}})
    for name in MODELS:
        patch_deployment(app, name, {"autoscaling_config": fixed,
                                     "ray_actor_options": {"num_cpus": args.model_cpus,
                                                           "num_gpus": args.model_gpus}})
        entry = next(d for d in app["deployments"] if d["name"] == name)
        if args.max_batch_size is not None:
            entry["user_config"]["max_batch_size"] = args.max_batch_size
        if args.batch_wait is not None:
            entry["user_config"]["batch_wait_timeout_s"] = args.batch_wait
        entry["max_ongoing_requests"] = max(entry.get("max_ongoing_requests", 5),
                                            entry["user_config"]["max_batch_size"])
    batching = next(d for d in app["deployments"] if d["name"] == "Segmenter")["user_config"]
    batched_size = int(batching["max_batch_size"])
    t = time.perf_counter()
    base = deploy(config)
    url = f"{base}/v1/predict"
    models = requests.get(f"{base}/v1/models", timeout=30).json()
    print(f"deployed in {time.perf_counter() - t:.1f} s; batching {batching}; model replicas "
          f"num_cpus={args.model_cpus} num_gpus={args.model_gpus}, devices "
          f"{[m['device'] for m in models.values()]}, torch threads "
          f"{[m['torch_threads'] for m in models.values()]}", flush=True)

    def set_batching(max_batch_size: int) -> None:
        """Live reconfigure through user_config; wait until both deployments report it."""
        for name in MODELS:
            patch_deployment(app, name, {"user_config": {"max_batch_size": max_batch_size}})
        deploy(config)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            models = requests.get(f"{base}/v1/models", timeout=10).json()
            if all(m["batching"]["max_batch_size"] == max_batch_size for m in models.values()):
                return
            time.sleep(0.5)
        raise RuntimeError("user_config change not applied within 60 s")

    threads = max(1, int(args.model_cpus))
    device = "cuda" if args.model_gpus > 0 else "cpu"
    amp = True if args.amp else None
    chain = Chain(Segmenter(load_bundle(seg_uri), device, amp=amp),
                  Classifier(load_bundle(cls_uri), device, amp=amp))
    asyncio.run(load(url, payload, 4, 16))  # warm-up
    chain_ms, http_ms = paired_overhead(chain, image, url, payload, args.pairs, threads)
    print(f"paired, one at a time: in-process Chain p50 {chain_ms:.1f} ms "
          f"({threads} torch thread(s)), HTTP p50 {http_ms:.1f} ms", flush=True)

    results: dict[tuple[str, int], dict[str, Any]] = {}
    current = batched_size
    for i, (c, n) in enumerate(zip(levels, counts)):
        for mode in (("batched", "unbatched") if i % 2 == 0 else ("unbatched", "batched")):
            want = batched_size if mode == "batched" else 1
            if want != current:
                set_batching(want)
                current = want
                asyncio.run(load(url, payload, 2, 4))  # settle
            r = results[(mode, c)] = asyncio.run(load(url, payload, c, n))
            print(f"  {mode:9s} c={c:<3d} n={n:<4d} p50={r['p50']:7.1f} ms  "
                  f"p95={r['p95']:7.1f}  p99={r['p99']:7.1f}  {r['rps']:6.2f} req/s  "
                  f"errors={r['errors']}", flush=True)

    # The gain: alternating rounds at concurrency 16, total requests over total time per mode.
    totals = {"batched": [0, 0.0], "unbatched": [0, 0.0]}
    modes = ["batched", "unbatched"] if current == batched_size else ["unbatched", "batched"]
    for i in range(args.gain_rounds):
        for mode in (modes if i % 2 == 0 else modes[::-1]):  # ABBAAB...: fewest switches
            want = batched_size if mode == "batched" else 1
            if want != current:
                set_batching(want)
                current = want
                asyncio.run(load(url, payload, 2, 4))
            r = asyncio.run(load(url, payload, 16, args.gain_requests))
            totals[mode][0] += r["n"]
            totals[mode][1] += r["n"] / r["rps"]
            print(f"  gain round {i + 1}: {mode:9s} c=16 n={r['n']} {r['rps']:6.2f} req/s",
                  flush=True)
    rps16 = {mode: n / wall for mode, (n, wall) in totals.items()}

    default_threads = torch.get_num_threads()
    chain_default_ms, _ = paired_overhead(chain, image, url, payload, 5, default_threads)
    server = results[("batched", levels[0])]["server"]
    serve.shutdown()
    ray.shutdown()

    print()
    print(f"image {args.image_size}x{args.image_size} PNG ({len(payload)} bytes), bundles "
          f"{seg_uri} / {cls_uri}")
    print(f"in-process Chain p50: {chain_ms:.1f} ms with {threads} torch thread(s) "
          f"(as a replica), {chain_default_ms:.1f} ms with {default_threads} (default); "
          f"HTTP p50 one at a time: {http_ms:.1f} ms")
    print(f"server-side stage medians at c={levels[0]} (batched): "
          + ", ".join(f"{k}={v:.1f}" for k, v in server.items()))
    print()
    print("| batching | concurrency | requests | p50 ms | p95 ms | p99 ms | req/s | errors |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for mode in ("batched", "unbatched"):
        label = f"on (max {batched_size})" if mode == "batched" else "off (max 1)"
        for c in levels:
            r = results[(mode, c)]
            print(f"| {label} | {c} | {r['n']} | {r['p50']:.1f} | {r['p95']:.1f} | "
                  f"{r['p99']:.1f} | {r['rps']:.2f} | {r['errors']} |")
    print(f"\nconcurrency 16 over {args.gain_rounds} alternating rounds: batched "
          f"{rps16['batched']:.2f} req/s, unbatched {rps16['unbatched']:.2f} req/s")
    gain = rps16["batched"] / rps16["unbatched"]
    print(f"RESULT serve_overhead_p50={http_ms / chain_ms:.3f} serve_batching_gain={gain:.3f}",
          flush=True)


if __name__ == "__main__":
    main()
