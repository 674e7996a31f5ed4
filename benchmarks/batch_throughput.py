"""Throughput of the bulk segmentation job versus a plain loop (not a test).

Both paths process the same images of ``../shared/data/busi_full`` (BUSI at original
resolution, 190-1048 px wide; by default all 647, ``--images N`` takes the first N by sorted
id; ``--repeat K`` makes an archive of K symlinked copies, so the job's start-up is amortised
as over a nightly archive) with the same bundles: the default classic U-Net
(`pipelines/conf/model/unet.yaml`, 256x256 input) and the lesion classifier
(`pipelines/conf/classifier/cnn.yaml`), untrained (random weights cost the same to run).

- loop: one process, ``Chain.from_uris(...)``, then for each file: read bytes, decode,
  ``chain.predict([image])``; torch with its default threads (all cores). It writes nothing.
- job: ``pipelines/segment_batch.run`` end to end (listing, output scan, actor pool start,
  prediction, mask PNGs + Parquet parts + manifest written) with ``limit=N`` into a fresh
  output directory, default ``batch=cpu`` settings (one actor per core, one torch thread and
  one image per forward pass in each); layout ``busi`` with ``ground_truth=false`` so it reads
  the same files as the loop. Its images/s is N / the wall time of the whole call, actor
  start-up included; the steady rate after the first committed batch is printed too.

- bound (``--bound``, CPU only): the same plain loop in one process per core, one torch thread
  each, the files dealt out round-robin, all started together once warmed up. It writes
  nothing and pays no Ray, so no job of one actor per core can beat it: ``bound / loop`` is
  the most ``batch_vs_loop`` can reach on this machine, measured in the same run.

Ray workers run at the loop's priority (``RAY_worker_niceness=0``; Ray's default is nice 15,
which matters only on a machine shared with other work). Both paths are warmed first (files
read once into the page cache; the loop predicts two images; a 4-image job run starts and
stops a pool) and then timed once each, the loop in two halves (before and after the job) so
that drift in the machine's load hits both paths. The last line is

    RESULT batch_vs_loop=<job images/s / loop images/s>

    python3 scripts/dev.py bench batch_throughput                 # the whole archive
    python3 scripts/dev.py bench batch_throughput --images 240 --batch-size 8 --torch-threads 1
    python3 scripts/dev.py bench batch_throughput --gpu           # batch=gpu, loop on cuda
    python3 scripts/dev.py bench batch_throughput --gpu --repeat 10   # 6,470 images
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Ray starts its workers at nice 15; the loop runs at nice 0. On a shared machine that alone
# would hand the loop the CPU, so both run at the same priority (the local cluster reads this).
os.environ.setdefault("RAY_worker_niceness", "0")

import torch  # noqa: E402
import yaml  # noqa: E402

from medseg_core.checkpoint import make_bundle_config, save_bundle  # noqa: E402
from medseg_core.inference import Chain  # noqa: E402
from medseg_core.io import decode_image, read_bytes  # noqa: E402
from medseg_core.layouts import list_records  # noqa: E402
from medseg_core.models import build_model  # noqa: E402
from pipelines.config import load_config  # noqa: E402
from pipelines.train import classifier_model  # noqa: E402

CONF = ROOT / "pipelines" / "conf"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "busi_full"))
    p.add_argument("--images", type=int, default=None,
                   help="first N images by sorted id (default: the whole archive)")
    p.add_argument("--repeat", type=int, default=1,
                   help="archive of K copies of the images (symlinks): start-up amortised as "
                        "over a large archive")
    p.add_argument("--gpu", action="store_true",
                   help="job with batch=gpu (four actors per GPU), loop on cuda")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per job batch (default: the batch config's)")
    p.add_argument("--actors", type=int, default=None, help="actor pool size (default: config)")
    p.add_argument("--gpus-per-actor", type=float, default=None,
                   help="GPU share per actor (default: the batch config's; 0.25 = 4 per GPU)")
    p.add_argument("--cpus-per-actor", type=float, default=None,
                   help="CPUs per actor (default: the batch config's)")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch threads per actor (default: the batch config's)")
    p.add_argument("--bound", action="store_true",
                   help="also time one plain loop per core (1 torch thread each): the most "
                        "any one-actor-per-core job can reach")
    p.add_argument("--io-threads", type=int, default=None,
                   help="reads/decodes in flight per actor (default: the batch config's)")
    return p.parse_args()


def make_bundles(folder: Path) -> tuple[str, str]:
    data = yaml.safe_load((CONF / "data" / "busi_full.yaml").read_text())
    seg_model = yaml.safe_load((CONF / "model" / "unet.yaml").read_text())
    cls_model = classifier_model(yaml.safe_load((CONF / "classifier" / "cnn.yaml").read_text()),
                                 data["class_names"])
    common = {"input_size": data["image_size"], "mean": data["mean"], "std": data["std"]}
    torch.manual_seed(0)
    seg = save_bundle(str(folder / "seg"), build_model(seg_model),
                      make_bundle_config(seg_model, task="segmentation", **common))
    cls = save_bundle(str(folder / "cls"), build_model(cls_model),
                      make_bundle_config(cls_model, task="classification",
                                         class_names=data["class_names"], **common))
    return seg, cls


def repeated_archive(src: str, dst: Path, k: int) -> str:
    """`k` copies of the BUSI-layout archive `src` as symlinks under `dst` (names prefixed
    r0_, r1_, ...), so both paths read k times the files through the page cache."""
    for cls_dir in sorted(p for p in Path(src).iterdir() if p.is_dir()):
        (dst / cls_dir.name).mkdir(parents=True)
        for f in cls_dir.iterdir():
            for i in range(k):
                (dst / cls_dir.name / f"r{i}_{f.name}").symlink_to(f.resolve())
    return str(dst)


def loop(chain: Chain, records: list) -> float:
    """Seconds of the plain single-process loop over the records."""
    start = time.perf_counter()
    for rec in records:
        chain.predict([decode_image(read_bytes(rec.image_uri), keep_grey=True)])  # as the job
    return time.perf_counter() - start


def _bound_worker(seg: str, cls: str, uris: list[str], barrier, queue) -> None:
    torch.set_num_threads(1)
    chain = Chain.from_uris(seg, cls)
    for uri in uris[:2]:  # warm-up, as the loop's
        chain.predict([decode_image(read_bytes(uri), keep_grey=True)])
    barrier.wait()
    start = time.perf_counter()
    for uri in uris:
        chain.predict([decode_image(read_bytes(uri), keep_grey=True)])
    queue.put(time.perf_counter() - start)


def bound(seg: str, cls: str, records: list, procs: int) -> float:
    """Seconds for `procs` processes, each a plain loop with one torch thread over every
    procs-th record, started together: from the common start to the last one's end."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # fork would copy torch's thread pools
    barrier, queue = ctx.Barrier(procs + 1), ctx.Queue()
    uris = [r.image_uri for r in records]
    workers = [ctx.Process(target=_bound_worker, args=(seg, cls, uris[i::procs], barrier, queue))
               for i in range(procs)]
    for w in workers:
        w.start()
    barrier.wait()
    start = time.perf_counter()
    for _ in workers:
        queue.get()
    seconds = time.perf_counter() - start
    for w in workers:
        w.join()
    return seconds


def batch_kind(args: argparse.Namespace) -> str:
    return "gpu" if args.gpu else "cpu"


def job_overrides(args: argparse.Namespace, seg: str, cls: str, out: Path, n: int) -> list[str]:
    over = [f"input={args.data}", "layout=busi", "ground_truth=false",
            f"bundles.segmenter={seg}", f"bundles.classifier={cls}", f"output={out}",
            f"limit={n}", f"batch={batch_kind(args)}"]
    for key, value in (("batch_size", args.batch_size), ("torch_threads", args.torch_threads),
                       ("io_threads", args.io_threads), ("concurrency", args.actors),
                       ("num_gpus", args.gpus_per_actor), ("num_cpus", args.cpus_per_actor)):
        if value is not None:
            over.append(f"batch.{key}={value}")
    return over


def main() -> None:
    args = parse_args()
    if not Path(args.data).is_dir():
        sys.exit(f"{args.data} is absent")
    from pipelines.cluster import connect
    from pipelines.segment_batch import run

    tmp = Path(tempfile.mkdtemp(prefix="medseg-bench-"))
    try:
        if args.repeat > 1:
            args.data = repeated_archive(args.data, tmp / "archive", args.repeat)
        records = list_records(args.data, "busi").records[: args.images]
        n = len(records)
        seg, cls = make_bundles(tmp)
        for rec in records:  # page cache
            read_bytes(rec.image_uri)
        connect(dashboard=False)
        cores = os.cpu_count()
        print(f"{n} images of {args.data}, {cores} cores; torch threads in the loop: "
              f"{torch.get_num_threads()}", flush=True)

        run(load_config(job_overrides(args, seg, cls, tmp / "warm", 4),
                        config_name="segment_batch"))
        chain = Chain.from_uris(seg, cls, device="cuda" if args.gpu else "cpu")
        loop(chain, records[:2])
        # the loop's two halves before and after the job, so load drift hits both paths
        half = n // 2
        loop_s = loop(chain, records[:half])
        cfg = load_config(job_overrides(args, seg, cls, tmp / "out", n),
                          config_name="segment_batch")
        start = time.perf_counter()
        manifest = run(cfg)
        job_s = time.perf_counter() - start
        assert manifest["run"]["processed"] == n, manifest["run"]
        loop_s += loop(chain, records[half:])
        bound_s = bound(seg, cls, records, cores) if args.bound and not args.gpu else None

        loop_ips, job_ips = n / loop_s, n / job_s
        b = cfg["batch"]
        per_gpu = 1 / float(b["num_gpus"]) if float(b["num_gpus"] or 0) > 0 else 0
        actors = b["concurrency"] or (f"{per_gpu:g} per GPU ({b['num_cpus']} CPUs each)"
                                      if args.gpu else f"{cores} (one per CPU)")
        print()
        print("| path | images | seconds | images/s |")
        print("| --- | ---: | ---: | ---: |")
        where = "cuda" if args.gpu else f"torch {torch.get_num_threads()} threads"
        print(f"| plain loop, 1 process, {where} | {n} | "
              f"{loop_s:.1f} | {loop_ips:.2f} |")
        print(f"| job end to end ({batch_kind(args)}): {actors} actors x "
              f"{b['torch_threads']} torch thread(s), batch {b['batch_size']}, model batch "
              f"{b['model_batch_size']} | {n} | {job_s:.1f} | {job_ips:.2f} |")
        r = manifest["run"]
        print(f"| job, steady state (after the first batch, {r['first_commit_seconds']:.1f} s "
              f"of pool start-up) | {n} | | {r['steady_images_per_s']:.2f} |")
        if bound_s is not None:
            print(f"| bound: {cores} plain loops, one per core, 1 torch thread each | {n} | "
                  f"{bound_s:.1f} | {n / bound_s:.2f} |")
            print(f"\nat most batch_vs_loop={loop_s / bound_s:.2f} for one actor per core "
                  "(bound / loop)")
        print()
        print(f"RESULT batch_vs_loop={job_ips / loop_ips:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
