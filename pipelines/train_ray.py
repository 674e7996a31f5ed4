"""The Ray Train edge of `pipelines/train.py`: the same per-worker loop (`pipelines.loop`), fed by
Ray Data shards, DDP over gloo (CPU) or NCCL (GPU), checkpoints reported to Ray Train. A failed
worker group restarts (`FailureConfig`) and a rerun with the same run name resumes, both from
the stage's `latest/` bundle in the run directory, as in-process training does.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import ray
import torch
import torch.distributed as dist
from ray.data import Dataset
from ray.train import (
    Checkpoint,
    CheckpointConfig,
    DataConfig,
    FailureConfig,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchTrainer, get_device, prepare_model

from medseg_core.layouts import Record
from pipelines.cluster import check_fits, check_shared_paths, connect
from pipelines.data import build_dataset, build_datasets, problem_ledger, task_credentials
from pipelines.loop import broadcast_buffers, fit_stage, score_key
from pipelines.runlog import RunLog, join
from pipelines.train import format_epoch, run_dir, stage_spec


class RayContext:
    """A Ray Train worker's runtime: its dataset shards, DDP, and `ray.train.report`."""

    def __init__(self, config: dict[str, Any]):
        cfg = config["cfg"]
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = get_device()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.train_shard = ray.train.get_dataset_shard("train")
        self.val_shard = ray.train.get_dataset_shard(f"val_{self.rank}")
        self.batch_size = int(cfg["train"]["batch_size"])
        self.eval_batch_size = int(cfg["train"]["eval_batch_size"])
        self.steps = int(config["steps_per_epoch"])
        # a cached Dataset replays one record order every epoch: reshuffle rows locally instead
        cached = bool(cfg["trainer"].get("cache_data")) and bool(cfg["data"].get("shuffle"))
        self.shuffle_buffer = 8 * self.batch_size if cached else None
        self.seed = int(cfg.get("seed", 0)) * 100_003 + self.rank
        self.log = RunLog(run_dir(cfg), config["stage"]) if self.rank == 0 else None

    def _batches(self, shard, batch_size: int, drop_last: bool, **shuffle: Any):
        return shard.iter_torch_batches(
            batch_size=batch_size, drop_last=drop_last,
            dtypes={"image": torch.uint8, "mask": torch.uint8, "label": torch.int64},
            device="cpu", prefetch_batches=2, **shuffle,
        )

    def train_batches(self, epoch: int):
        # every worker gets the same number of rows (streaming_split(equal=True)); drop_last
        # keeps the number of DDP steps equal too
        shuffle = {}
        if self.shuffle_buffer:
            shuffle = {"local_shuffle_buffer_size": self.shuffle_buffer,
                       "local_shuffle_seed": self.seed + 1_000 * epoch}
        return self._batches(self.train_shard, self.batch_size, drop_last=True, **shuffle)

    def val_batches(self):
        return self._batches(self.val_shard, self.eval_batch_size, drop_last=False)

    def steps_per_epoch(self) -> int:
        return self.steps

    def wrap_model(self, model):
        return prepare_model(model, move_to_device=False)

    def all_sum(self, values: np.ndarray) -> np.ndarray:
        if self.world_size == 1:
            return values
        dev = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        t = torch.as_tensor(values, dtype=torch.float64, device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu().numpy()

    def sync_buffers(self, module: torch.nn.Module) -> None:
        if self.world_size > 1:
            broadcast_buffers(module)

    def resume_dir(self) -> str | None:
        # the run's latest/ bundle, which the train Dataset's augmentation epoch was taken from
        # (resumed_train_dataset), not Ray's last reported checkpoint: a kill between
        # RunLog.record and ray.train.report leaves Ray's one epoch behind latest/, and a run
        # continued on Ray after in-process epochs has none of them; resuming from it would
        # train those epochs again with other epochs' draws. Rank 0 looks (and puts back a
        # latest/ a kill left beside its place) and tells the others.
        latest = [self.log.resume_dir() if self.log is not None else None]
        if self.world_size > 1:
            dist.broadcast_object_list(latest, src=0)
        return latest[0]

    def report(self, metrics, bundle_dir, history) -> None:
        if self.log is not None:
            self.log.record(metrics, bundle_dir, history)
            # not print(): Train V2 patches it in workers to tee into its logger (shown twice)
            sys.stdout.write(format_epoch(metrics) + "\n")
            sys.stdout.flush()
        ckpt = Checkpoint.from_directory(bundle_dir) if bundle_dir else None
        ray.train.report(dict(metrics), checkpoint=ckpt)


def quiet_report_lines() -> None:
    """Ray Train logs each worker's every `ray.train.report` at INFO on the console, the whole
    metrics dict on one line (two lines an epoch with two workers, beside the epoch line rank 0
    prints), under a logger named after its file, which `RunConfig`'s `LoggingConfig` does not
    reach. The metrics are in the run's CSV and TensorBoard files."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # moved in another Ray version: its lines stay
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs in each Ray Train worker."""
    quiet_report_lines()
    ctx = RayContext(config)
    try:
        fit_stage(stage_spec(config["cfg"], config["stage"]), ctx)
    finally:
        if ctx.log is not None:
            ctx.log.close()


def init_ray(trainer: dict[str, Any], read_cpus: float = 1.0) -> None:
    """Connect, leaving Ray Data's read tasks `read_cpus` (data.read.num_cpus) beside the
    trainer workers on a cluster started here (otherwise the run waits forever for resources)."""
    num_cpus = trainer.get("local_num_cpus")
    if not num_cpus:
        need = int(trainer["num_workers"]) * float(trainer.get("cpus_per_worker", 1)) + read_cpus
        num_cpus = max(os.cpu_count() or 1, math.ceil(need))
    connect(trainer.get("address"), num_cpus)


def scaling_config(trainer: dict[str, Any]) -> ScalingConfig:
    use_gpu = bool(trainer.get("use_gpu", False))
    resources = {"CPU": float(trainer.get("cpus_per_worker", 1))}
    if use_gpu:
        resources["GPU"] = float(trainer.get("gpus_per_worker", 1))
    return ScalingConfig(num_workers=int(trainer["num_workers"]), use_gpu=use_gpu,
                         resources_per_worker=resources)


def keep_checkpoints(trainer: dict[str, Any]) -> int | None:
    """`trainer.num_to_keep`: how many checkpoints Ray keeps (null: every one)."""
    keep = trainer.get("num_to_keep", 2)
    return None if keep is None else int(keep)


def storage(cfg: dict[str, Any]) -> str:
    """Ray Train's storage path: ``<run dir>/ray``, local (absolute) or ``s3://``. Ray resolves
    an ``s3://`` path with pyarrow, which, like fsspec for the run's other files, takes the
    endpoint and credentials from the environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
    ...) of every node."""
    base = join(run_dir(cfg), "ray")
    return base if "://" in base else os.path.abspath(base)


def resumed_train_dataset(cfg: dict[str, Any], stage: str,
                          records: list[Record]) -> Callable[[], Dataset]:
    """The train split's Dataset as a factory. Ray Train calls it at every worker-group start:
    the first, and each restart after a worker failure (`FailureConfig`). Each time, its
    augmentation and shuffle epochs start at the epoch the stage resumes at (the next epoch
    of its latest bundle), so neither a rerun nor a restarted group replays the first epochs'
    draws: a Dataset built once would count its passes from `data.epoch_offset` again in every
    new group."""

    # taken here, on the driver: Ray Train calls the factory in its controller actor, whose
    # environment need not hold the driver's AWS_* credentials (data.forward_credentials)
    credentials = task_credentials(cfg["data"], str(cfg["data"]["url"]))
    ledger = problem_ledger(cfg)
    first = RunLog(run_dir(cfg), stage).resume_epoch()

    def build() -> Dataset:
        try:
            resume = RunLog(run_dir(cfg), stage).resume_epoch()
        except Exception as e:  # the run directory unreadable from the controller's node
            warnings.warn(f"resume epoch not readable here ({type(e).__name__}); the data "
                          f"goes on from epoch {first}", stacklevel=2)
            resume = first
        data = {**cfg["data"], "epoch_offset": int(cfg["data"].get("epoch_offset", 0)) + resume}
        return build_dataset(records, {**cfg, "data": data}, split="train", ledger=ledger,
                             credentials=credentials)

    return build


def join_cluster(cfg: dict[str, Any], read_cpus: float) -> None:
    """Connect to Ray and refuse at once a worker group that a local cluster started here can
    never hold, with a Ray Data read task (`read_cpus`, data.read.num_cpus) beside it unless
    the data is read before training (trainer.cache_data): the workers wait for their
    batches, the read task for a CPU, for ever; on a cluster joined, refuse a local
    `output_dir` or archive the workers' nodes do not see. Before the archive is listed or the
    run directory written."""
    trainer = cfg["trainer"]
    init_ray(trainer, read_cpus)
    world = int(trainer["num_workers"])
    per_worker = scaling_config(trainer).resources_per_worker or {}
    need = {k: world * float(v) for k, v in per_worker.items()}
    what = f"trainer.num_workers={world} ({per_worker} each)"
    if not trainer.get("cache_data"):
        need["CPU"] = need.get("CPU", 0.0) + read_cpus
        what += f" with a read task beside them (data.read.num_cpus={read_cpus:g})"
    hints = {"GPU": "Set trainer.use_gpu=false on a machine without GPUs, or join a cluster "
                    "that has them (trainer.address or RAY_ADDRESS).",
             "CPU": "Use fewer workers or CPUs per worker (trainer.num_workers, "
                    "trainer.cpus_per_worker), more CPUs for the local cluster "
                    "(trainer.local_num_cpus), read the data before training "
                    "(trainer.cache_data=true), or join a cluster (trainer.address or "
                    "RAY_ADDRESS)."}
    check_fits(need, what, hints)
    check_shared_paths({"output_dir": str(cfg["output_dir"])},
                       {"data.url": str(cfg["data"]["url"])},
                       per_worker, world, f"the {world} training worker(s)")


def run_ray(cfg: dict[str, Any], splits: dict[str, list[Record]], stage: str) -> str:
    """Train one stage with a TorchTrainer; returns its best bundle."""
    trainer = cfg["trainer"]
    init_ray(trainer)  # joined and checked by train.run (join_cluster)
    world = int(trainer["num_workers"])
    path = storage(cfg)
    spec = stage_spec(cfg, stage)
    vals = {f"val_{r}": splits["val"][r::world] for r in range(world)}
    datasets: dict[str, Any] = build_datasets(cfg, vals)
    if trainer.get("cache_data"):
        # decode once into the object store: small archives, benchmarks (CPU augmentation
        # is then fixed; trainer.gpu_augment stays random per epoch)
        datasets["train"] = resumed_train_dataset(cfg, stage, splits["train"])()
        datasets = {name: ds.materialize() for name, ds in datasets.items()}
    else:
        datasets["train"] = resumed_train_dataset(cfg, stage, splits["train"])
    steps = expected_steps(len(splits["train"]), world, int(cfg["train"]["batch_size"]))
    print(f"[{stage}] Ray Train: {world} worker(s), {len(splits['train'])} train / "
          f"{len(splits['val'])} val images, {steps} steps per epoch", flush=True)
    result = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "stage": stage, "steps_per_epoch": steps},
        scaling_config=scaling_config(trainer),
        run_config=RunConfig(
            name=f"{cfg['run_name']}-{stage}",
            storage_path=path,
            failure_config=FailureConfig(max_failures=int(trainer.get("max_failures", 3))),
            checkpoint_config=CheckpointConfig(
                num_to_keep=keep_checkpoints(trainer),
                checkpoint_score_attribute=score_key(spec),
                checkpoint_score_order="max",
            ),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),
    ).fit()
    if result.error:
        raise result.error
    return RunLog(run_dir(cfg), stage).best


def expected_steps(n_train: int, world: int, batch_size: int) -> int:
    """Optimiser steps per epoch on each worker (equal shards, last partial batch dropped)."""
    return max(1, (n_train // world) // batch_size)
