"""Load benchmark of the Serve endpoint (not a test).

Deploys `serving/config.yaml` (bundle URIs and replica counts patched) on a local Ray cluster,
sends a bounded number of real HTTP requests with a 256x256 PNG at several concurrencies, with
the config's batching and then with batching switched off (max_batch_size=1, applied live
through the deployments' user_config), and times `inference.Chain` in-process on the same
image and bundles. Prints a table; the last line is

    RESULT serve_overhead_p50=<HTTP p50 at concurrency 1 / in-process Chain p50>
           serve_batching_gain=<batched req/s / unbatched req/s at concurrency 16>

The in-process Chain runs with as many torch threads as a model replica gets (Ray gives an
actor `num_cpus` threads, at least 1), so the ratio measures what serving adds, not a
difference in compute; the default-thread figure is printed too.

    python3 scripts/dev.py bench serve_load                  # untrained bundles, default models
    python3 scripts/dev.py bench serve_load --segmenter s3://b/seg --classifier s3://b/cls
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
import torch  # noqa: E402
import yaml  # noqa: E402

from medseg_core.checkpoint import load_bundle, make_bundle_config, save_bundle  # noqa: E402
from medseg_core.inference import Chain, Classifier, Segmenter  # noqa: E402
from medseg_core.io import decode_image, encode_png  # noqa: E402
from medseg_core.models import build_model  # noqa: E402
from medseg_core.synthetic import make_sample  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--segmenter", help="segmenter bundle URI (default: untrained, default model)")
    p.add_argument("--classifier", help="classifier bundle URI (default: untrained, default model)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--input-size", type=int, default=256, help="input size of generated bundles")
    p.add_argument("--concurrency", default="1,8,16,32")
    p.add_argument("--requests", default="40,120,160,192",
                   help="requests per concurrency level (same order)")
    p.add_argument("--max-batch-size", type=int, default=None,
                   help="batched run's max_batch_size (default: serving/config.yaml)")
    p.add_argument("--batch-wait", type=float, default=None,
                   help="batched run's batch_wait_timeout_s (default: serving/config.yaml)")
    p.add_argument("--model-cpus", type=float, default=1.0,
                   help="num_cpus (and so torch threads) of each model replica")
    p.add_argument("--chain-runs", type=int, default=30)
    p.add_argument("--num-cpus", type=int, default=4,
                   help="Ray's logical CPUs (bookkeeping only: room for the replicas asked for)")
    return p.parse_args()


def make_bundles(root: Path, input_size: int) -> tuple[str, str]:
    """Untrained bundles with the project's default architectures (pipelines/conf)."""
    conf = ROOT / "pipelines" / "conf"
    seg_cfg = yaml.safe_load((conf / "model" / "unet.yaml").read_text())
    cls_cfg = yaml.safe_load((conf / "classifier" / "cnn.yaml").read_text())
    data = yaml.safe_load((conf / "data" / "synthetic.yaml").read_text())
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


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


async def load(url: str, payload: bytes, concurrency: int, n: int) -> dict[str, Any]:
    """`n` POSTs, at most `concurrency` in flight; latencies in ms."""
    latencies: list[float] = []
    server: list[dict[str, float]] = []
    errors = 0
    queue = iter(range(n))
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as session:

        async def worker() -> None:
            nonlocal errors
            for _ in queue:
                t = time.perf_counter()
                async with session.post(url, data=payload,
                                        headers={"Content-Type": "image/png"}) as r:
                    body = await r.json()
                latencies.append((time.perf_counter() - t) * 1000)
                if r.status != 200:
                    errors += 1
                else:
                    server.append(body["timings"])

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {"n": n, "errors": errors, "rps": n / wall, "p50": percentile(latencies, 50),
            "p95": percentile(latencies, 95), "p99": percentile(latencies, 99),
            "server": {k: statistics.median(t[k] for t in server) for k in server[0]}
            if server else {}}


def time_chain(chain: Chain, image: np.ndarray, runs: int, threads: int) -> float:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(3):
            chain.predict([image])
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            chain.predict([image])
            times.append((time.perf_counter() - t) * 1000)
        return statistics.median(times)
    finally:
        torch.set_num_threads(before)


def main() -> None:
    args = parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    counts = [int(n) for n in args.requests.split(",")]
    if len(levels) != len(counts) or 16 not in levels:
        raise SystemExit("--concurrency and --requests need the same length and level 16")

    import ray
    from ray import serve

    from serving.launch import deploy, load_config, merge, patch_deployment

    tmp = Path(tempfile.mkdtemp(prefix="medseg-serve-bench-"))
    seg_uri, cls_uri = args.segmenter, args.classifier
    if not (seg_uri and cls_uri):
        seg_uri, cls_uri = make_bundles(tmp, args.input_size)

    rng = np.random.default_rng(0)
    grey, _ = make_sample("benign", args.image_size, rng)
    payload = encode_png(grey)
    image = decode_image(payload)

    chain = Chain(Segmenter(load_bundle(seg_uri)), Classifier(load_bundle(cls_uri)))
    replica_threads = max(1, int(args.model_cpus))
    chain_ms = time_chain(chain, image, args.chain_runs, replica_threads)
    chain_default_ms = time_chain(chain, image, args.chain_runs, torch.get_num_threads())
    del chain

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    port = free_port()
    config = load_config()
    config["http_options"] = {**config.get("http_options", {}), "host": "127.0.0.1",
                              "port": port}
    app = config["applications"][0]
    app["args"] = merge(app["args"], {"segmenter": {"bundle_uri": seg_uri},
                                      "classifier": {"bundle_uri": cls_uri},
                                      "auth": {"token_env": None}})
    fixed = {"min_replicas": 1, "max_replicas": 1}
    patch_deployment(app, "Ingress", {"autoscaling_config": fixed})
    batching = {}
    for name in ("Segmenter", "Classifier"):
        patch_deployment(app, name, {"autoscaling_config": fixed,
                                     "ray_actor_options": {"num_cpus": args.model_cpus}})
        entry = next(d for d in app["deployments"] if d["name"] == name)
        if args.max_batch_size is not None:
            entry["user_config"]["max_batch_size"] = args.max_batch_size
        if args.batch_wait is not None:
            entry["user_config"]["batch_wait_timeout_s"] = args.batch_wait
        entry["max_ongoing_requests"] = max(entry.get("max_ongoing_requests", 5),
                                            entry["user_config"]["max_batch_size"])
        batching[name] = dict(entry["user_config"])
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    t = time.perf_counter()
    deploy(config)
    print(f"deployed in {time.perf_counter() - t:.1f} s on 127.0.0.1:{port}; "
          f"batching {batching['Segmenter']}; model replicas num_cpus={args.model_cpus}",
          flush=True)
    url = f"http://127.0.0.1:{port}/v1/predict"

    results: dict[tuple[str, int], dict[str, Any]] = {}
    for mode in ("batched", "unbatched"):
        if mode == "unbatched":
            for name in ("Segmenter", "Classifier"):
                patch_deployment(app, name, {"user_config": {"max_batch_size": 1}})
            deploy(config)  # user_config only: replicas reconfigure in place
            time.sleep(2)
        asyncio.run(load(url, payload, 4, 16))  # warm-up
        for c, n in zip(levels, counts):
            r = asyncio.run(load(url, payload, c, n))
            results[(mode, c)] = r
            print(f"  {mode:9s} c={c:<3d} n={n:<4d} p50={r['p50']:7.1f} ms  "
                  f"p95={r['p95']:7.1f}  p99={r['p99']:7.1f}  {r['rps']:6.2f} req/s  "
                  f"errors={r['errors']}", flush=True)

    print()
    print(f"image {args.image_size}x{args.image_size} PNG ({len(payload)} bytes); "
          f"in-process Chain p50: {chain_ms:.1f} ms with {replica_threads} torch thread(s) "
          f"(as a replica), {chain_default_ms:.1f} ms with {torch.get_num_threads()} (default)")
    print()
    print("| batching | concurrency | requests | p50 ms | p95 ms | p99 ms | req/s | errors |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for (mode, c), r in results.items():
        label = (f"on (max {batching['Segmenter']['max_batch_size']})" if mode == "batched"
                 else "off (max 1)")
        print(f"| {label} | {c} | {r['n']} | {r['p50']:.1f} | {r['p95']:.1f} | "
              f"{r['p99']:.1f} | {r['rps']:.2f} | {r['errors']} |")
    server = results[("batched", levels[0])]["server"]
    print()
    print(f"server-side stage medians at c={levels[0]} (batched): "
          + ", ".join(f"{k}={v:.1f}" for k, v in server.items()))
    overhead = results[("batched", levels[0])]["p50"] / chain_ms
    gain = results[("batched", 16)]["rps"] / results[("unbatched", 16)]["rps"]
    serve.shutdown()
    ray.shutdown()
    print(f"RESULT serve_overhead_p50={overhead:.3f} serve_batching_gain={gain:.3f}")


if __name__ == "__main__":
    main()
