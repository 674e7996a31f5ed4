"""Ingest benchmark: how fast do decoded, resized, augmented training batches arrive?

    .venv/bin/python benchmarks/ingest.py                 # ../shared/data/busi_full, 256x256

On real variable-size PNGs (BUSI, original resolution) resized to 256x256 with the training
augmentations of `conf/data/busi_full.yaml`, in one run, page cache warmed first:

  (a) a single-process loop of read + decode + transform (the per-core limit)
  (b) torch DataLoader, 2 workers, over medseg_core.dataset.RecordDataset
  (c) the Ray Data pipeline of pipelines/data.py from the raw files, plus (c') the same with
      Ray Data's own per-operator budgets instead of medseg's read-ahead cap (`read_ahead=null`)
  (d) the same from the packed Parquet archive (pipelines/pack.py, original bytes), plus
      (d') from a pack pre-resized to 256x256 PNG (less decode work per epoch, for reference)

After one warm-up pass of each (workers started, files cached), the runs are timed in
interleaved rounds and the best round of each counts, so that other load on the machine
disturbs all of them alike. Peak memory (PSS of this
process and every process it started, i.e. the Ray cluster) is sampled while Ray Data streams
1x and 10x the archive (the record list repeated), and 10x again behind a consumer slower than
the reads (`--slow-ms` per batch). Last line:

    RESULT ingest_ray_vs_dataloader=<c/b> ingest_packed_vs_dataloader=<d/b> ingest_vs_limit=<c/(a*cores)>
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Ray starts its worker processes at nice 15, the DataLoader's workers run at nice 0: on a
# machine shared with other jobs that alone starves Ray's decode tasks. Compare like with like.
os.environ.setdefault("RAY_worker_niceness", "0")

import torch  # noqa: E402

from medseg_core.dataset import RecordDataset, collate  # noqa: E402
from medseg_core.transforms import build_transforms  # noqa: E402
from pipelines.cluster import connect  # noqa: E402
from pipelines.config import load_config  # noqa: E402
from pipelines.data import _spec, build_dataset, list_archive, list_packed, read_chunk  # noqa: E402
from pipelines.pack import pack_archive  # noqa: E402

# ---------------------------------------------------------------------------------- memory


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    return kids


def tree_pss_mb(root: int) -> float:
    """Proportional set size of `root` and all its descendants (shared memory counted once)."""
    kids, todo, total = _children(), [root], 0
    while todo:
        pid = todo.pop()
        todo += kids.get(pid, [])
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total / 1024


CPU_KINDS = ("driver", "workers", "ray actors", "ray daemons")
# Long-lived Ray worker processes that hold no read task: Ray Data's and Ray's own actors and
# agents, and medseg's bad-record ledger. Idle, each still costs some CPU.
_ACTORS = ("ray::_", "ray::DashboardAgent", "ray::RuntimeEnvAgent", "ray::ProblemLedger")


def _cpu_kind(pid: int, root: int) -> str:
    if pid == root:
        return "driver"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "workers"
    if cmd.startswith(_ACTORS):
        return "ray actors"
    if cmd.startswith("ray::") or "default_worker.py" in cmd:
        return "workers"
    if any(k in cmd for k in ("raylet", "gcs_server", "dashboard", "log_monitor", "runtime_env",
                              "monitor.py", "ray/_private", "ray/autoscaler")):
        return "ray daemons"
    return "workers"  # DataLoader workers


def tree_cpu(root: int) -> dict[str, float]:
    """User + system CPU seconds of `root` and its live descendants (Ray workers persist), by
    kind: the driver (this process), workers (Ray's read tasks, DataLoader workers), Ray's
    helper actors and agents (`_ACTORS`), Ray's daemons (raylet, GCS, log monitor)."""
    kids, todo = _children(), [root]
    ticks = dict.fromkeys(CPU_KINDS, 0)
    while todo:
        pid = todo.pop()
        todo += kids.get(pid, [])
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks[_cpu_kind(pid, root)] += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return {k: v / os.sysconf("SC_CLK_TCK") for k, v in ticks.items()}


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


class PeakMemory:
    """Samples tree_pss_mb(this process) in a thread; `.peak` in MB."""

    def __init__(self, interval: float = 0.25):
        self.interval, self.peak, self._stop = interval, 0.0, threading.Event()

    def __enter__(self) -> PeakMemory:
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_pss_mb(os.getpid()))
            self._stop.wait(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, tree_pss_mb(os.getpid()))


# ---------------------------------------------------------------------------------- runs


def warm_cache(records) -> int:
    n = 0
    for r in records:
        for u in (r.image_uri, *r.mask_uris):
            n += len(Path(u).read_bytes())
    return n


def single_process(records, transform, seed: int, epoch: int = 0) -> float:
    """(a): the DataLoader workers' per-sample code (read, decode, transform) in a plain loop."""
    ds = RecordDataset(records, transform, seed=seed)
    ds.set_epoch(epoch)
    t = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    return len(records) / (time.perf_counter() - t)


def task_function_loop(records, cfg, per_task: int, epoch: int = 0) -> float:
    """(a'): the Ray read tasks' own function (`read_chunk`: read, decode, transform, stack
    `per_task` records into one block) in a plain loop, without Ray."""
    spec = _spec(cfg, "train", True, ledger=None)
    items = [r.to_dict() for r in records]
    t = time.perf_counter()
    for start in range(0, len(items), per_task):
        read_chunk("raw", items[start:start + per_task], spec, epoch)
    return len(records) / (time.perf_counter() - t)


class Loader:
    """(b): a persistent-worker DataLoader; `epoch()` times one pass."""

    def __init__(self, records, transform, seed: int, batch: int, workers: int):
        self.ds = RecordDataset(records, transform, seed=seed)
        self.loader = torch.utils.data.DataLoader(
            self.ds, batch_size=batch, shuffle=True, collate_fn=collate, num_workers=workers,
            persistent_workers=True, prefetch_factor=4)
        self.n_epoch = 0

    def epoch(self) -> float:
        self.ds.set_epoch(self.n_epoch)
        self.n_epoch += 1
        t, n = time.perf_counter(), 0
        for b in self.loader:
            n += len(b["label"])
        return n / (time.perf_counter() - t)


def ray_epoch(ds, batch: int, delay_s: float = 0.0) -> tuple[float, int]:
    """One pass over a Ray Dataset (each pass is the next augmentation epoch); `delay_s` per
    batch stands for a consumer slower than the reads."""
    t, n = time.perf_counter(), 0
    for b in ds.iter_torch_batches(batch_size=batch, prefetch_batches=4):
        n += len(b["label"])
        if delay_s:
            time.sleep(delay_s)
    return n / (time.perf_counter() - t), n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "busi_full"))
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16, help="training batch size")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    ap.add_argument("--repeat", type=int, default=10, help="archive multiple for the memory run")
    ap.add_argument("--read-batch", type=int, default=None, help="records per Ray read task")
    ap.add_argument("--rounds", type=int, default=4, help="timed rounds (best one counts)")
    ap.add_argument("--slow-ms", type=float, default=150.0,
                    help="per-batch delay of the slow consumer in the memory run")
    args = ap.parse_args()

    cores = len(os.sched_getaffinity(0))
    tmp = tempfile.mkdtemp(prefix="medseg-ingest-")
    overrides = ["data=busi_full", f"data.url={args.data}", f"output_dir={tmp}",
                 f"data.image_size=[{args.size},{args.size}]", "data.report=null"]
    if args.read_batch:
        overrides.append(f"data.read.batch_size={args.read_batch}")
    cfg = load_config(overrides)
    data = cfg["data"]
    records = list_archive(data).records
    seed = int(cfg["seed"])
    transform = build_transforms({"size": [args.size, args.size], **data["augment"]}, train=True)
    print(f"archive {args.data}: {len(records)} image+mask pairs, "
          f"{warm_cache(records) / 2**20:.0f} MiB (page cache warmed); {cores} cores; "
          f"resize {args.size}x{args.size} + {transform}", flush=True)

    import ray

    connect(num_cpus=cores, dashboard=False)  # as the pipelines start Ray (pipelines/cluster.py)
    t = time.perf_counter()
    packed_dir, resized_dir = f"{tmp}/packed", f"{tmp}/packed{args.size}"
    pack_archive({**cfg, "pack": {"out": packed_dir, "shard_size": 128, "row_group_rows": 32}})
    pack_s = time.perf_counter() - t
    pack_archive({**cfg, "pack": {"out": resized_dir, "shard_size": 128, "row_group_rows": 32,
                                  "encoding": "png", "resize_to": [args.size, args.size]}})
    pk_cfg = {**cfg, "data": {**data, "url": packed_dir, "layout": "packed"}}
    rs_cfg = {**cfg, "data": {**data, "url": resized_dir, "layout": "packed"}}
    raw_ds = build_dataset(records, cfg, split="train")
    # (c') the same with Ray Data's own per-operator budgets instead of medseg's read-ahead cap
    own = {**cfg, "data": {**data, "read": {**data["read"], "read_ahead": None}}}
    own_ds = build_dataset(records, own, split="train")
    packed_ds = build_dataset(list_packed(packed_dir)[0], pk_cfg, split="train")
    resized_ds = build_dataset(list_packed(resized_dir)[0], rs_cfg, split="train")
    loader = Loader(records, transform, seed, args.batch, args.workers)

    # Warm-up pass of everything (workers started, files cached), then `rounds` interleaved
    # timed rounds; the best round of each counts (robust to other load on the machine).
    warm_cache(records)
    runs = {
        "a": lambda: single_process(records, transform, seed),
        "a'": lambda: task_function_loop(records, cfg, int(data["read"]["batch_size"])),
        "b": loader.epoch,
        "c": lambda: ray_epoch(raw_ds, args.batch)[0],
        "c'": lambda: ray_epoch(own_ds, args.batch)[0],
        "d": lambda: ray_epoch(packed_ds, args.batch)[0],
        "d'": lambda: ray_epoch(resized_ds, args.batch)[0],
    }
    for name in ("b", "c", "c'", "d", "d'"):
        runs[name]()
    best: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}   # CPU seconds per image
    kinds: dict[str, list[dict[str, float]]] = {k: [] for k in runs}  # the same, by process kind
    me = os.getpid()
    for r in range(args.rounds):
        for name, fn in runs.items():
            c0, p0 = tree_cpu(me), time.process_time()
            rate = fn()
            c1 = tree_cpu(me)
            by_kind = {k: (c1[k] - c0[k]) / len(records) for k in CPU_KINDS}
            per_image = ((time.process_time() - p0) / len(records) if name in ("a", "a'")
                         else sum(by_kind.values()))
            best[name].append(rate)
            cpu[name].append(per_image)
            kinds[name].append(by_kind)
        print(f"round {r + 1} (load {loadavg()}): "
              + "  ".join(f"{k}={v[-1]:.1f}" for k, v in best.items()), flush=True)
    a, b, c, c2, d, d2 = (max(best[k]) for k in ("a", "b", "c", "c'", "d", "d'"))
    # CPU-normalised rates: images per CPU-second of everything involved (this process, its
    # DataLoader workers, the Ray cluster), times the cores; insensitive to other load.
    cpu_rate = {k: cores / min(v) if k not in ("a", "a'") else 1 / min(v)
                for k, v in cpu.items()}
    print(f"(a) single process            {a:8.1f} images/s", flush=True)
    a1 = max(best["a'"])
    print(f"(a') read_chunk in a loop     {a1:8.1f} images/s   (a'/a = {a1 / a:.2f})", flush=True)
    print(f"(b) DataLoader, {args.workers} workers      {b:8.1f} images/s", flush=True)
    print(f"(c) Ray Data, raw files       {c:8.1f} images/s", flush=True)
    print(f"(c') same, Ray's op budgets   {c2:8.1f} images/s", flush=True)
    print(f"(d) Ray Data, packed Parquet  {d:8.1f} images/s   (pack: {pack_s:.1f}s)", flush=True)
    print(f"(d') Ray Data, packed {args.size}px PNG {d2:6.1f} images/s", flush=True)
    print("CPU ms per image by process kind (round with the least CPU):", flush=True)
    for name in ("b", "c", "c'", "d", "d'"):
        k = min(kinds[name], key=lambda d: sum(d.values()))
        print(f"    ({name}) " + ", ".join(f"{kind} {v * 1000:.2f}" for kind, v in k.items()),
              flush=True)
    del loader, runs
    gc.collect()

    # Memory while streaming 1x and 10x the archive; then 10x behind a consumer slower than
    # the reads, where only backpressure keeps decoded blocks from piling up.
    mem = {}
    k = args.repeat
    for key, times, delay in ((1, 1, 0.0), (k, k, 0.0), ("slow", k, args.slow_ms / 1000)):
        ds = build_dataset(records * times, cfg, split="train")
        with PeakMemory() as pm:
            rate, n = ray_epoch(ds, args.batch, delay)
        mem[key] = (pm.peak, n, rate)
        slow = f", consumer sleeping {args.slow_ms:.0f} ms per batch" if delay else ""
        print(f"    peak memory, {times:2d}x archive ({n} images{slow}): {pm.peak:7.0f} MB "
              f"(driver + Ray cluster PSS), {rate:.1f} images/s", flush=True)

    cr = cpu_rate
    cr_c2, cr_d2 = cr["c'"], cr["d'"]
    print(f"\n| run | images/s (best of {args.rounds}) | ratio | images/s per {cores} cores of "
          "CPU time | ratio |\n| --- | ---: | --- | ---: | --- |")
    print(f"| (a) single process, decode+resize+augment | {a:.1f} | per-core limit "
          f"| {cr['a']:.1f} (1 core) | per-core limit |")
    cr_a1 = cr["a'"]
    print(f"| (a') single process, the read tasks' function (`read_chunk`) | {a1:.1f} | a'/a = "
          f"{a1 / a:.2f} | {cr_a1:.1f} (1 core) | a'/a = {cr_a1 / cr['a']:.2f} |")
    print(f"| (b) torch DataLoader, {args.workers} workers | {b:.1f} | 1.00 | {cr['b']:.1f} | 1.00 |")
    print(f"| (c) Ray Data, raw files | {c:.1f} | c/b = {c / b:.2f}, c/(a x {cores}) = "
          f"{c / (a * cores):.2f} | {cr['c']:.1f} | c/b = {cr['c'] / cr['b']:.2f}, "
          f"c/(a x {cores}) = {cr['c'] / (cr['a'] * cores):.2f} |")
    print(f"| (c') the same, Ray Data's own budgets (`data.read.read_ahead=null`) | {c2:.1f} | c'/b = "
          f"{c2 / b:.2f}, c'/(a x {cores}) = {c2 / (a * cores):.2f} | {cr_c2:.1f} | "
          f"c'/b = {cr_c2 / cr['b']:.2f} |")
    print(f"| (d) Ray Data, packed Parquet (original bytes) | {d:.1f} | d/b = {d / b:.2f} "
          f"| {cr['d']:.1f} | d/b = {cr['d'] / cr['b']:.2f} |")
    print(f"| (d') Ray Data, packed {args.size}px PNG | {d2:.1f} | d'/b = {d2 / b:.2f} "
          f"| {cr_d2:.1f} | d'/b = {cr_d2 / cr['b']:.2f} |")
    print(f"\npeak memory: {mem[1][0]:.0f} MB at 1x ({mem[1][1]} images), {mem[k][0]:.0f} MB at "
          f"{k}x ({mem[k][1]} images): x{mem[k][0] / mem[1][0]:.2f}; {mem['slow'][0]:.0f} MB at "
          f"{k}x behind the slow consumer ({mem['slow'][2]:.1f} images/s)")
    ray.shutdown()
    print(f"load average at the end: {loadavg()} (other processes on the machine skew wall "
          "clock; the CPU-time columns do not depend on them)")
    print(f"RESULT ingest_ray_vs_dataloader={c / b:.3f} ingest_packed_vs_dataloader={d / b:.3f} "
          f"ingest_vs_limit={c / (a * cores):.3f}")


if __name__ == "__main__":
    main()
