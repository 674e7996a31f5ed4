"""Training: in-process and Ray Train (2 CPU workers, DDP over gloo), fault injection, resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.config import load_config
from pipelines.train import LocalContext

TINY = [
    # instance-norm improved U-Net: learns these lesions within a few dozen steps
    "model=improved_unet", "model.widths=[8,16,32]", "model.dropout=0.0",
    "classifier.widths=[8,16]",
    "data.generate.n_per_class=20", "data.generate.size=64", "data.image_size=[64,64]",
    "train.batch_size=4", "train.eval_batch_size=8",
    "train.optimizer.lr=0.005",
]


def config(tmp_path: Path, *extra: str) -> dict:
    return load_config([f"output_dir={tmp_path}", *TINY, *extra])


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_local_training_writes_bundles_and_logs(tmp_path, capsys):
    from pipelines.train import run

    cfg = config(tmp_path, "trainer=local", "train.epochs=3", "train.classifier_epochs=1",
                 "run_name=local")
    bundles = run(cfg, release=lambda: print("RELEASED"))
    # the closing lines come after the entry point has left Ray (pipelines.cluster.disconnect)
    out = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    # the chain's masks of images classified normal: cleared where that scores higher
    (choice,) = [line for line in out if line.startswith("[clear masks] validation Dice ")]
    from medseg_core.checkpoint import read_bundle_meta

    cleared = read_bundle_meta(bundles["classifier"])[1].get("lesion_free_classes")
    assert choice.endswith(": cleared" if cleared == ["normal"] else ": kept"), (choice, cleared)
    closing = out[-6:] if cleared else out[-5:]
    assert closing[:2] == ["RELEASED", "bundles:"], out[-7:]
    assert closing[4].startswith("test split (") and " Dice " in closing[4]
    if cleared:
        assert closing[5].startswith("  through the chain (masks of images classified normal")
    stage_dir = tmp_path / "runs" / "local" / "segmenter"
    rows = read_csv(stage_dir / "metrics.csv")
    assert [int(float(r["epoch"])) for r in rows] == list(range(3))
    from pipelines.runlog import RunLog

    # where a rerun with this name starts (and the augmentation epoch its data starts at)
    assert RunLog(str(tmp_path / "runs" / "local"), "segmenter").resume_epoch() == 3
    assert RunLog(str(tmp_path / "runs" / "nothing-yet"), "segmenter").resume_epoch() == 0
    losses = [float(r["train_loss"]) for r in rows]
    assert losses[-1] < losses[0]
    assert (stage_dir / "curves.png").stat().st_size > 1000
    assert any((stage_dir / "tb").iterdir())
    for stage in ("segmenter", "classifier"):
        assert (Path(bundles[stage]) / "version").exists()
        assert (tmp_path / "runs" / "local" / stage / "latest" / "weights.pt").exists()


@pytest.mark.ray
def test_ray_ddp_training_learns_and_merges_metrics_exactly(tmp_path, ray_cluster):
    from medseg_core.checkpoint import load_bundle
    from medseg_core.dataset import RecordDataset, collate
    from medseg_core.engine import StepConfig, validate_segmenter
    from medseg_core.inference import Chain
    from pipelines.data import load_splits
    from pipelines.train import cpu_transforms, run

    # the classifier trains on half predicted masks and is validated on predicted ones: the
    # workers load the segmenter bundle the first stage wrote
    cfg = config(tmp_path, "trainer=ray", "trainer.num_workers=2", "trainer.cpus_per_worker=0.5",
                 "train.epochs=5", "train.classifier_epochs=1", "run_name=ddp",
                 "train.classifier_masks.predicted=0.5", "train.classifier_masks.validate=predicted")
    bundles = run(cfg)
    rows = read_csv(tmp_path / "runs" / "ddp" / "segmenter" / "metrics.csv")
    assert [int(float(r["epoch"])) for r in rows] == list(range(5))
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    best_dice = max(float(r["val_dice"]) for r in rows)
    # an untrained model predicts noise or nothing: its Dice on these lesions is far below this
    assert best_dice > 0.5, rows

    # the Dice Ray merged from both workers' counts equals the Dice of the whole val split
    # computed in one process with the same bundle
    latest = load_bundle(str(tmp_path / "runs" / "ddp" / "segmenter" / "latest"))
    splits = load_splits(cfg)
    val = RecordDataset(splits["val"], cpu_transforms(cfg, train=False))
    loader = [collate([val[i] for i in range(len(val))])]
    step = StepConfig(mean=tuple(cfg["data"]["mean"]), std=tuple(cfg["data"]["std"]))
    meter, _ = validate_segmenter(latest.model, loader, step)
    whole = meter.aggregate()
    assert float(rows[-1]["val_images"]) == len(splits["val"])
    for key in ("dice", "iou", "sensitivity", "specificity", "precision"):
        assert float(rows[-1][f"val_{key}"]) == pytest.approx(whole[key], abs=1e-9), key
    # the ISIC 2018 score: the mean over images of each image's thresholded Jaccard
    assert float(rows[-1]["val_thresholded_jaccard"]) == pytest.approx(
        whole["thresholded_jaccard_mean"], abs=1e-9)

    cls_rows = read_csv(tmp_path / "runs" / "ddp" / "classifier" / "metrics.csv")
    assert float(cls_rows[-1]["val_images"]) == len(splits["val"])

    chain = Chain.from_uris(bundles["segmenter"], bundles["classifier"])
    out = chain.predict([np.full((70, 90, 3), 128, np.uint8)])
    assert out[0]["mask"].shape == (70, 90)
    assert out[0]["label_name"] in cfg["data"]["class_names"]


def executed_epochs(stage_dir: Path) -> list[int]:
    """Every epoch some process trained and recorded for this stage, repeats kept: each
    process's RunLog writes its own TensorBoard event file, which a resume does not rewrite."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    epochs = []
    for path in sorted((stage_dir / "tb").glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            epochs.extend(event.step for v in event.summary.value if v.tag.endswith("/train_loss"))
    return sorted(epochs)


class _BrightIsLesion(torch.nn.Module):
    """Predicts the lesion where the first channel is bright."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1] * 10.0


def _shifted_discs(n: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose bright disc is the true one shifted by 0, 1, 2, ... pixels (per-image IoU
    from 1 down to 0), plus one with no lesion and no prediction and one with no lesion but a
    prediction."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images, masks = [], []
    for i in range(n):
        truth = (yy - 8) ** 2 + (xx - 6) ** 2 <= 16
        pred = (yy - 8) ** 2 + (xx - 6 - i % 7) ** 2 <= 16
        if i == n - 2:
            truth, pred = truth & False, pred & False
        elif i == n - 1:
            truth = truth & False
        images.append((pred.to(torch.uint8) * 255)[..., None].expand(size, size, 3))
        masks.append(truth.to(torch.uint8))
    return torch.stack(images), torch.stack(masks)


def test_validation_metrics_merged_across_workers_equal_those_of_the_whole_set(tmp_path):
    from medseg_core.engine import StepConfig, validate_segmenter
    from medseg_core.losses import build_loss
    from medseg_core.metrics import thresholded_jaccard
    from pipelines.loop import epoch_metrics

    spec = _loop_spec(tmp_path)
    step = StepConfig(mean=tuple(spec.bundle_config["mean"]), std=tuple(spec.bundle_config["std"]))
    model = _BrightIsLesion()
    images, masks = _shifted_discs(13)

    def batches(idx):  # eval batches of 3, as each worker's val shard is read
        return [{"image": images[idx[i:i + 3]], "mask": masks[idx[i:i + 3]]}
                for i in range(0, len(idx), 3)]

    class Worker:
        rank, device = 0, torch.device("cpu")

        def __init__(self, idx, world_size, others):
            self.val, self.world_size, self.others = batches(idx), world_size, others
            self.sent = None

        def val_batches(self):
            return self.val

        def all_sum(self, values):
            self.sent = values.copy()
            return values + sum(self.others)

    # the rows split as Ray's val_<rank> datasets are (splits["val"][r::world]): 7 and 6 images
    parts = [torch.arange(13)[r::2] for r in range(2)]
    second = Worker(parts[1], 2, [])
    alone = epoch_metrics(spec, second, model, step)
    merged = epoch_metrics(spec, Worker(parts[0], 2, [second.sent]), model, step)

    meter, loss_sum = validate_segmenter(model, batches(torch.arange(13)), step,
                                         build_loss(spec.loss))
    whole = meter.aggregate()
    per_image = np.asarray(thresholded_jaccard(meter.counts))
    # the set exercises what could go wrong: per-image scores on both sides of 0.65, a global
    # IoU whose thresholding is not the per-image mean, workers whose means differ
    assert (per_image == 0).any() and ((per_image > 0) & (per_image < 1)).any()
    assert whole["thresholded_jaccard_mean"] != pytest.approx(whole["thresholded_jaccard"])
    assert alone["val_thresholded_jaccard"] != pytest.approx(whole["thresholded_jaccard_mean"])
    assert merged["val_images"] == 13
    for key in ("dice", "iou", "sensitivity", "specificity", "precision"):
        assert merged[f"val_{key}"] == pytest.approx(whole[key], abs=1e-12), key
    assert merged["val_thresholded_jaccard"] == pytest.approx(
        whole["thresholded_jaccard_mean"], abs=1e-12)
    assert merged["val_thresholded_jaccard"] == pytest.approx(per_image.mean(), abs=1e-12)
    assert merged["val_loss"] == pytest.approx(loss_sum / 13, rel=1e-6)
    # one process, one worker: the same numbers
    single = epoch_metrics(spec, Worker(torch.arange(13), 1, []), model, step)
    assert single["val_thresholded_jaccard"] == pytest.approx(merged["val_thresholded_jaccard"])


@pytest.mark.ray
def test_worker_failure_is_survived_and_rerun_resumes(tmp_path, ray_cluster, monkeypatch,
                                                     capsys):
    from pipelines import train_ray
    from pipelines.train import run

    # fails at the start of epoch 2, after epochs 0 and 1 were checkpointed: a restart from
    # scratch would train them again
    args = ["trainer=ray", "trainer.num_workers=2", "trainer.cpus_per_worker=0.5",
            "train.epochs=3", "stages=[segmenter]", "run_name=faulty",
            "trainer.max_failures=1", "trainer.fail_at_epoch.segmenter=2"]
    run(config(tmp_path, *args))
    run_dir = tmp_path / "runs" / "faulty"
    stage_dir = run_dir / "segmenter"
    assert (run_dir / ".fail-segmenter").exists(), "the injected failure did not happen"
    rows = read_csv(stage_dir / "metrics.csv")
    assert [int(float(r["epoch"])) for r in rows] == [0, 1, 2]  # continuous, none repeated
    executed = executed_epochs(stage_dir)
    assert set(executed) == {0, 1, 2}
    assert len(executed) - len(set(executed)) <= 1, executed  # at most one epoch repeated
    ray_dir = run_dir / "ray" / "faulty-segmenter"
    assert len(list(ray_dir.glob("checkpoint_*"))) >= 1

    # same run name, one more epoch: resumes at epoch 3 and trains only that one
    run(config(tmp_path, *args[:-2], "train.epochs=4"))
    rows = read_csv(stage_dir / "metrics.csv")
    assert [int(float(r["epoch"])) for r in rows] == [0, 1, 2, 3]
    assert executed_epochs(stage_dir) == sorted([*executed, 3])

    # a finished run again: the driver says so, and starts no worker group for nothing
    def no_worker_group(*args, **kwargs):
        raise AssertionError("a worker group started for a finished stage")

    monkeypatch.setattr(train_ray, "run_ray", no_worker_group)
    capsys.readouterr()
    bundles = run(config(tmp_path, *args[:-2], "train.epochs=4"))
    assert bundles["segmenter"].endswith("faulty/segmenter/best")
    assert "[segmenter] already trained (4 of 4 epochs done): nothing to do" in \
        capsys.readouterr().out


@pytest.mark.ray
def test_ray_training_resumes_from_the_runs_latest_bundle_not_rays_last_checkpoint(
        tmp_path, ray_cluster):
    """Ray's last reported checkpoint can lag the stage's latest/ bundle (a kill between
    RunLog.record and ray.train.report; epochs trained in-process since): the workers resume
    where the train Dataset's augmentation epoch was taken from, latest/, not one epoch back."""
    from pipelines.train import run

    args = ["train.epochs=2", "stages=[segmenter]", "run_name=mixed"]
    on_ray = ["trainer=ray", "trainer.num_workers=2", "trainer.cpus_per_worker=0.5"]
    run(config(tmp_path, *on_ray, *args))
    run(config(tmp_path, "trainer=local", *args, "train.epochs=3"))  # epoch 2, Ray not told
    stage_dir = tmp_path / "runs" / "mixed" / "segmenter"
    before = read_csv(stage_dir / "metrics.csv")
    assert [int(float(r["epoch"])) for r in before] == [0, 1, 2]

    run(config(tmp_path, *on_ray, *args, "train.epochs=4"))
    assert executed_epochs(stage_dir) == [0, 1, 2, 3]  # epoch 2 not trained again
    rows = read_csv(stage_dir / "metrics.csv")
    assert [int(float(r["epoch"])) for r in rows] == [0, 1, 2, 3]
    assert rows[2]["train_loss"] == before[2]["train_loss"]  # the in-process epoch kept


@pytest.mark.ray
def test_gpus_the_local_cluster_lacks_are_refused_not_waited_for(tmp_path, ray_cluster):
    """trainer.use_gpu=true on a Ray instance this process started without GPUs: refused at
    once (Ray waited for ever for a node that nothing would add)."""
    from pipelines.train import run

    if ray_cluster.cluster_resources().get("GPU"):
        pytest.skip("this machine has a GPU")
    cfg = config(tmp_path, "trainer=ray", "trainer.use_gpu=true", "trainer.num_workers=1",
                 "stages=[segmenter]", "train.epochs=1", "run_name=gpu")
    with pytest.raises(RuntimeError, match=r"needs 2 CPU, 1 GPU.* has \d+ CPU, 0 GPU \(Ray sees "
                                           r"no GPU on this machine\)"):
        run(cfg)
    assert not (tmp_path / "runs" / "gpu").exists()  # refused before listing and splits.json
    # a worker per CPU leaves none for the read tasks that feed them: the run hung, its
    # workers waiting for batches and the read task for a CPU; the advice is about CPUs (it
    # said to switch GPUs off)
    cpus = int(ray_cluster.cluster_resources()["CPU"])
    with pytest.raises(RuntimeError, match=rf"num_workers={cpus} .* with a read task beside "
                                           rf"them \(data.read.num_cpus=1\) needs {cpus + 1} "
                                           r"CPU.*Use fewer workers or CPUs per worker"):
        run(config(tmp_path, "trainer=ray", f"trainer.num_workers={cpus}",
                   "stages=[segmenter]", "train.epochs=1", "run_name=cpu"))
    assert not (tmp_path / "runs" / "cpu").exists()


@pytest.mark.s3
@pytest.mark.ray
def test_training_to_object_storage_checkpoints_there_and_resumes(tmp_path, s3):
    """`output_dir=s3://...` as a user runs it: the entry point in its own process and its own
    local Ray cluster, endpoint and credentials only in the environment."""
    import os
    import subprocess
    import sys

    import fsspec

    from medseg_core.inference import Chain

    root = Path(__file__).resolve().parents[1]
    s3.create_bucket("medseg-train")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))},
           **s3.env, "PYTHONPATH": str(root), "RAY_ADDRESS": "local"}

    def train(epochs: int) -> None:
        cmd = [sys.executable, str(root / "pipelines" / "train.py"), *TINY,
               "output_dir=s3://medseg-train/exp", f"data.url={tmp_path / 'synthetic'}",
               "trainer=ray", "trainer.num_workers=1", "trainer.local_num_cpus=2",
               "stages=[segmenter]", "run_name=s3", f"train.epochs={epochs}"]
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=400)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        # output to a pipe, as to a log file: Ray Data's log lines, not bars drawn with cursor
        # movements (thousands of lines per epoch from the workers' datasets)
        out = done.stdout + done.stderr
        assert "\x1b[A" not in out
        assert "Progress will be logged" in out
        # one line an epoch (rank 0's), not also Ray's dump of every worker's report
        assert f"epoch {epochs - 1:3d}  train_loss=" in out
        assert "Reporting training result" not in out

    train(2)
    train(3)  # same run name: resumes from the checkpoint on S3 and trains epoch 2 only
    assert not (tmp_path / "s3:").exists()  # Hydra's log folder, made locally from the URL
    fs = fsspec.filesystem("s3", **s3.storage_options)
    fs.invalidate_cache()
    stage = "medseg-train/exp/runs/s3/segmenter"
    rows = list(csv.DictReader(fs.cat_file(f"{stage}/metrics.csv").decode().splitlines()))
    assert [int(float(r["epoch"])) for r in rows] == [0, 1, 2]
    assert {"best", "latest", "curves.png", "tb"} <= {p.rsplit("/", 1)[-1] for p in fs.ls(stage)}
    assert any("/checkpoint_" in p for p in fs.find("medseg-train/exp/runs/s3/ray/s3-segmenter"))
    # the second run trained one epoch: three in the event files of the two processes
    local = tmp_path / "stage"
    fs.get(f"{stage}/tb", str(local / "tb"), recursive=True)
    assert executed_epochs(local) == [0, 1, 2]
    image = np.full((64, 64, 3), 128, np.uint8)
    seg_uri = f"s3://{stage}/best"
    chain = Chain.from_uris(seg_uri, None, storage_options=s3.storage_options)
    assert chain.predict([image])[0]["mask"].shape == (64, 64)


def test_a_multirun_gives_each_job_its_run_and_writes_nothing_where_it_is_started(tmp_path):
    """`-m` (Hydra multirun) put its folders under ./multirun in the working directory."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd = [sys.executable, str(root / "pipelines" / "train.py"), "-m", *TINY,
           f"output_dir={tmp_path / 'out'}", "trainer=local", "stages=[segmenter]",
           "train.epochs=1", "data.generate.n_per_class=5", "run_name=seed${seed}", "seed=0,1"]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert list(cwd.iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "out" / "runs").iterdir()) == ["seed0", "seed1"]
    [sweep] = (tmp_path / "out" / "hydra" / "multirun").iterdir()
    assert {"0-seed0", "1-seed1"} <= {p.name for p in sweep.iterdir()}

def test_hydras_folders_for_an_object_storage_output_dir_are_local():
    import tempfile

    from pipelines import local_dir

    assert local_dir("./outputs") == "./outputs" and local_dir("/data/o") == "/data/o"
    assert local_dir("file:///data/o") == "/data/o"
    assert local_dir("s3://bucket/exp/") == f"{tempfile.gettempdir()}/medseg-hydra/s3/bucket/exp"
    assert local_dir("gs://b/a b") == f"{tempfile.gettempdir()}/medseg-hydra/gs/b/a_b"


def _bn_worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from pipelines.loop import broadcast_buffers

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    bn = torch.nn.BatchNorm2d(3)
    bn.train()
    bn(torch.randn(4, 3, 5, 5) * (rank + 1) + rank)  # each worker's own last batch
    broadcast_buffers(bn)
    torch.save({k: v.clone() for k, v in bn.state_dict().items()}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_metrics_csv_keeps_its_columns_and_integer_epochs_across_a_resume(tmp_path):
    """A rerun reads the earlier rows back from a bundle's metrics.json (keys sorted, epochs as
    floats): the CSV it rewrites keeps the loop's column order, epoch first, epochs whole."""
    from pipelines.runlog import RunLog

    fresh = {"epoch": 1.0, "train_loss": 0.5, "val_dice": 0.7, "lr": 0.001}
    earlier = dict(sorted({**fresh, "epoch": 0.0, "train_loss": 0.9}.items()))  # as read back
    log = RunLog(str(tmp_path / "run"), "segmenter")
    log.record(fresh, None, [earlier, fresh])
    log.close()
    with open(tmp_path / "run" / "segmenter" / "metrics.csv") as f:
        lines = f.read().splitlines()
    assert lines[0] == "epoch,train_loss,val_dice,lr"
    assert [line.split(",")[0] for line in lines[1:]] == ["0", "1"]


def test_workers_validate_with_rank_0s_batchnorm_statistics(tmp_path):
    """DDP syncs buffers only in a training forward: without the broadcast each worker would
    validate its own running statistics, not the model rank 0 saves."""
    import torch.multiprocessing as mp

    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_bn_worker, args=(2, init, str(tmp_path)), nprocs=2, join=True)
    states = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in (0, 1)]
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(states[0][key], states[1][key]), key
    assert not torch.allclose(states[0]["running_mean"], torch.zeros(3))  # rank 0's, updated


def test_local_training_honours_data_epoch_offset(tmp_path):
    """`data.epoch_offset` is the augmentation epoch of the first pass, in-process as on Ray."""
    from pipelines.train import run

    losses = []
    for offset in (0, 5):
        run(config(tmp_path, "trainer=local", "stages=[segmenter]", "train.epochs=1",
                   f"run_name=offset{offset}", f"data.epoch_offset={offset}"))
        rows = read_csv(tmp_path / "runs" / f"offset{offset}" / "segmenter" / "metrics.csv")
        losses.append(float(rows[0]["train_loss"]))
    assert losses[0] != losses[1]  # other augmentations and order, same initial weights


def test_a_run_name_resumes_only_under_its_own_data_split_and_model(tmp_path, capsys):
    """A rerun of a finished run under other data, split or model is refused before anything
    is read or written (it skipped the stages as done, re-chose the post-processing on the new
    validation split and printed the old model's Dice as the new data's); the run's own
    settings go on, and a finished stage says it was skipped."""
    from medseg_core.checkpoint import read_bundle_meta
    from pipelines.train import run

    base = ["trainer=local", "stages=[segmenter]", "train.epochs=1", "run_name=same"]
    run(config(tmp_path, *base))
    best = tmp_path / "runs" / "same" / "segmenter" / "best"
    before = (best / "version").read_text(), (best / "config.yaml").read_text()
    assert read_bundle_meta(str(best))[1]["training_data"]["layout"] == "busi"
    for override, named in (("data.generate.seed=7", "training_data.url"),
                            ("data.split.ratios=[0.6,0.2,0.2]", "training_data.split"),
                            ("data.image_size=[32,32]", "input_size"),
                            ("model.widths=[8,16,24]", "model.widths"),
                            ("data.class_names=[normal,benign,malignant,other]", "class_names"),
                            # the validation Dice that picked the best epoch is taken at it
                            ("train.threshold=0.3", "threshold")):
        if override.startswith("data.generate"):
            # the same archive under another name: a different data.url
            override = f"data.url={tmp_path / 'data' / 'synthetic'}-copy"
            import shutil
            shutil.copytree(tmp_path / "data" / "synthetic", f"{tmp_path}/data/synthetic-copy",
                            dirs_exist_ok=True)
        with pytest.raises(ValueError, match=f"other settings .*{named}"):
            run(config(tmp_path, *base, override))
    # a stage the rerun does not train holds it to its split too: the classifier would train,
    # and the mask clearing be chosen, on images the run's segmenter trained on
    with pytest.raises(ValueError, match="holds a segmenter trained with other settings "
                                         r"\(training_data.split differ"):
        run(config(tmp_path, "trainer=local", "stages=[classifier]", "run_name=same",
                   "data.split.ratios=[0.6,0.2,0.2]"))
    assert not (tmp_path / "runs" / "same" / "classifier").exists()
    assert ((best / "version").read_text(), (best / "config.yaml").read_text()) == before
    capsys.readouterr()
    run(config(tmp_path, *base, "train.eval_batch_size=2"))  # not part of what the run is
    assert "[segmenter] already trained (1 of 1 epochs done)" in capsys.readouterr().out
    # nor are the k-fold settings of a ratio split, which splitting ignores
    run(config(tmp_path, *base, "data.split.n_folds=3", "data.split.fold=2"))
    assert "[segmenter] already trained (1 of 1 epochs done)" in capsys.readouterr().out


def test_a_finished_stage_is_not_reported_as_trained_under_other_training_settings(
        tmp_path, capsys):
    """A rerun of a finished run under another learning rate (a Hydra multirun over it with one
    run_name) trained nothing and printed the first training's figures as the new setting's.
    With epochs left it goes on under the new settings, and says so."""
    from medseg_core.checkpoint import read_bundle_meta
    from pipelines.train import run

    base = ["trainer=local", "stages=[segmenter]", "run_name=recipe"]
    run(config(tmp_path, *base, "train.epochs=1"))
    best = tmp_path / "runs" / "recipe" / "segmenter" / "best"
    assert read_bundle_meta(str(best))[1]["training"]["train.optimizer"]["lr"] == 0.005
    for override, named in (("train.optimizer.lr=0.001", r"train.optimizer.lr: 0.005 -> 0.001"),
                            ("train.batch_size=2", r"train.batch_size: 4 -> 2"),
                            ("data.augment.rotate=30", r"data.augment.rotate: 15 -> 30"),
                            ("train.loss.bce_weight=2", r"train.loss.bce_weight: 1.0 -> 2")):
        with pytest.raises(ValueError, match=rf"has finished its segmenter under other training "
                                             rf"settings \({named}\): this rerun would train"):
            run(config(tmp_path, *base, "train.epochs=1", override))
    capsys.readouterr()
    run(config(tmp_path, *base, "train.epochs=2", "train.optimizer.lr=0.001"))
    out = capsys.readouterr().out
    assert ("[segmenter] resuming at epoch 1 under other training settings than its epochs so "
            "far: train.optimizer.lr: 0.005 -> 0.001") in out
    latest = tmp_path / "runs" / "recipe" / "segmenter" / "latest"
    assert read_bundle_meta(str(latest))[1]["training"]["train.optimizer"]["lr"] == 0.001
    assert [r["epoch"] for r in read_csv(latest.parent / "metrics.csv")] == ["0", "1"]


def test_a_stage_stopped_early_goes_on_under_a_larger_patience(tmp_path, capsys):
    """With no learning (lr 1e-12) the validation score never beats epoch 0's, so patience 1 stops
    at epoch 1. A rerun said "a larger epoch count goes on from here" and trained nothing under
    any setting: a larger patience (or 0, off) would not have stopped there, so it goes on."""
    from pipelines.train import run

    base = ["trainer=local", "stages=[segmenter]", "train.epochs=5", "run_name=es",
            "train.optimizer.lr=1e-12", "train.optimizer.weight_decay=0"]
    csv_path = tmp_path / "runs" / "es" / "segmenter" / "metrics.csv"
    run(config(tmp_path, *base, "train.early_stopping_patience=1"))
    assert [r["epoch"] for r in read_csv(csv_path)] == ["0", "1"]
    capsys.readouterr()
    run(config(tmp_path, *base, "train.early_stopping_patience=1", "train.epochs=9"))
    assert ("[segmenter] already trained (stopped early: no better validation score in 1 "
            "epochs): nothing to do; a larger train.early_stopping_patience (or 0, off) goes on "
            "from here") in capsys.readouterr().out
    run(config(tmp_path, *base, "train.early_stopping_patience=3"))
    assert [r["epoch"] for r in read_csv(csv_path)] == ["0", "1", "2", "3"]
    run(config(tmp_path, *base, "train.early_stopping_patience=0"))
    assert [r["epoch"] for r in read_csv(csv_path)] == ["0", "1", "2", "3", "4"]


def test_a_second_run_under_the_same_name_is_refused_while_the_first_holds_it(tmp_path):
    """Two runs under one run_name trained side by side, each resuming from and overwriting
    the other's bundles and logs, and both ended "successfully"."""
    import json
    import subprocess
    import sys
    import time

    from pipelines.runlog import LOCK_FILE, LOCK_STALE_S, RunLock
    from pipelines.train import run

    base = ["trainer=local", "stages=[segmenter]", "train.epochs=1", "run_name=busy"]
    lock_file = tmp_path / "runs" / "busy" / LOCK_FILE
    holder = RunLock(str(tmp_path / "runs" / "busy"))
    holder.acquire("busy")
    try:
        with pytest.raises(RuntimeError, match=r"run 'busy' is being trained by another process "
                                               r"\(.*, pid \d+, since .*Wait for it, or use "
                                               r"another run_name"):
            run(config(tmp_path, *base))
        assert not (tmp_path / "runs" / "busy" / "segmenter").exists()
    finally:
        holder.release()
    assert not lock_file.exists()
    run(config(tmp_path, *base))
    assert (tmp_path / "runs" / "busy" / "segmenter" / "best").is_dir()
    assert not lock_file.exists()  # released at the end
    # the lock of a run killed on this machine is taken over at once: its process is gone
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    now = time.time()
    lock = {"token": "t", "host": holder.token.split(":")[0], "pid": int(gone.stdout),
            "started": now, "beat": now}
    lock_file.write_text(json.dumps(lock))
    run(config(tmp_path, *base, "train.epochs=2"))
    assert not lock_file.exists()
    # another machine's lock holds until it has not been renewed for LOCK_STALE_S
    elsewhere = {**lock, "host": "another-node", "pid": 1}
    assert RunLock.held(elsewhere, now=now + 1)
    assert not RunLock.held(elsewhere, now=now + LOCK_STALE_S + 1)


def test_two_starts_that_both_find_no_lock_do_not_both_take_it(tmp_path, monkeypatch):
    """Two starts at the same instant both read no lock, both wrote theirs and both trained
    (6 of 20 simultaneous starts of two processes)."""
    from pipelines.runlog import RunLock

    first, second = RunLock(str(tmp_path / "run")), RunLock(str(tmp_path / "run"))
    real, reads = RunLock._read, {}

    def first_read_finds_none(self):  # each start read before the other wrote
        reads[id(self)] = reads.get(id(self), 0) + 1
        return None if reads[id(self)] == 1 else real(self)

    monkeypatch.setattr(RunLock, "_read", first_read_finds_none)
    first.acquire("r")
    try:
        with pytest.raises(RuntimeError, match="being trained by another process"):
            second.acquire("r")
    finally:
        first.release()


def test_a_refused_second_start_leaves_the_holders_bundles_where_they_lie(tmp_path):
    """A refused start put back `latest/` from `latest.new` (check_resumable, before the lock)
    while the run holding the lock was between its two renames: that run then died on its
    own rename."""
    import json
    import os
    import shutil
    import time

    from pipelines.runlog import LOCK_FILE
    from pipelines.train import run

    base = ["trainer=local", "stages=[segmenter]", "train.epochs=1", "run_name=swap"]
    run(config(tmp_path, *base))
    stage = tmp_path / "runs" / "swap" / "segmenter"
    shutil.copytree(stage / "latest", stage / "latest.old")  # the holder mid-swap
    os.rename(stage / "latest", stage / "latest.new")
    now = time.time()
    (tmp_path / "runs" / "swap" / LOCK_FILE).write_text(json.dumps(
        {"token": "holder", "host": os.uname().nodename, "pid": os.getpid(), "started": now,
         "beat": now}))
    with pytest.raises(RuntimeError, match="being trained by another process"):
        run(config(tmp_path, *base))
    assert sorted(p.name for p in stage.iterdir() if p.name.startswith("latest")) == [
        "latest.new", "latest.old"]


def test_a_rerun_writes_the_log_rows_a_kill_after_the_latest_bundle_left_out(tmp_path, capsys):
    """A kill after `latest/` was written and before the logs left metrics.csv, TensorBoard
    and the curves an epoch short for good: the finished stage's reruns wrote nothing."""
    import shutil

    from pipelines.train import run

    base = ["trainer=local", "stages=[segmenter]", "train.epochs=2", "run_name=short"]
    run(config(tmp_path, *base))
    stage = tmp_path / "runs" / "short" / "segmenter"
    rows = read_csv(stage / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["0", "1"]
    # as the kill left them: the last row missing (and the file cut inside a row), the last
    # epoch's TensorBoard events and the curves gone
    text = (stage / "metrics.csv").read_text()
    (stage / "metrics.csv").write_text(text[:text.index("\n1,") + 3])
    shutil.rmtree(stage / "tb")
    (stage / "curves.png").unlink()
    capsys.readouterr()
    run(config(tmp_path, *base))
    out = capsys.readouterr().out
    assert "[segmenter] logs caught up with the latest bundle: 1 epoch(s) added" in out
    assert read_csv(stage / "metrics.csv") == rows
    assert (stage / "curves.png").is_file() and any((stage / "tb").iterdir())
    run(config(tmp_path, *base))  # nothing missing: nothing written
    assert "logs caught up" not in capsys.readouterr().out


def test_an_epoch_is_in_metrics_csv_only_once_its_scalars_and_curves_are_written(tmp_path,
                                                                                 monkeypatch):
    """metrics.csv was written first: a kill after it and before TensorBoard and the curves
    left those an epoch short for good, since a rerun catches up by the CSV's epochs."""
    from pipelines.runlog import RunLog

    log = RunLog(str(tmp_path / "run"), "segmenter")
    history = [{"epoch": 0.0, "train_loss": 1.0, "val_dice": 0.2}]
    log.record(dict(history[0]), None, history)
    history = [*history, {"epoch": 1.0, "train_loss": 0.8, "val_dice": 0.3}]

    def killed(self, history):
        raise KeyboardInterrupt  # as a kill between the scalars and the rest

    monkeypatch.setattr(RunLog, "_write_curves", killed)
    with pytest.raises(KeyboardInterrupt):
        log.record(dict(history[1]), None, history)
    assert [r["epoch"] for r in read_csv(tmp_path / "run" / "segmenter" / "metrics.csv")] == \
        ["0"]
    monkeypatch.undo()
    assert RunLog(str(tmp_path / "run"), "segmenter").catch_up({"history": history}) == 1


def test_a_start_that_died_before_its_first_bundle_does_not_fix_the_runs_split(tmp_path):
    """splits.json was written once, at a run's first start: a start that died before its
    first epoch's bundle left it, and a rerun under another split (nothing to resume, so not
    refused) trained on that split while splits.json named the dead start's. Evaluation then
    refused the run's own test split and took the dead start's, whose images it trained on."""
    import json
    import warnings

    from pipelines.data import load_splits
    from pipelines.runlog import read_splits, split_digest
    from pipelines.train import run

    base = ["trainer=local", "stages=[segmenter]", "train.epochs=1", "run_name=died"]
    with pytest.raises(RuntimeError, match="injected failure at epoch 0"):
        run(config(tmp_path, *base, "trainer.fail_at_epoch.segmenter=0"))
    first = read_splits(str(tmp_path / "runs" / "died"))
    cfg = config(tmp_path, *base, "data.split.seed=1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "the archive changed" warning: nothing was trained
        run(cfg)
    recorded = read_splits(str(tmp_path / "runs" / "died"))
    assert recorded == {k: split_digest([r.id for r in v]) for k, v in load_splits(cfg).items()}
    assert recorded != first, json.dumps(first)


def test_a_kill_while_the_postprocess_choice_is_written_leaves_a_usable_best(tmp_path,
                                                                            monkeypatch):
    import os

    from fsspec.implementations.local import LocalFileSystem

    import pipelines.tuning as tuning_module
    from medseg_core.checkpoint import load_bundle
    from pipelines.train import run

    class Killed(Exception):
        pass

    cfg = config(tmp_path, "trainer=local", "stages=[segmenter]", "train.epochs=2",
                 "train.postprocess=flip", "run_name=pp")
    best = str(tmp_path / "runs" / "pp" / "segmenter" / "best")
    armed = []  # set once training is over and the chosen option is written into best/
    real_load, real_pipe, real_rename = (tuning_module.load_bundle, LocalFileSystem.pipe_file,
                                         os.rename)

    def load(uri, *args, **kwargs):
        armed.append(uri)
        return real_load(uri, *args, **kwargs)

    def pipe(self, path, *args, **kwargs):  # an in-place rewrite of best/
        if armed and str(path).startswith(best + "/"):
            raise Killed
        return real_pipe(self, path, *args, **kwargs)

    def rename(src, dst, *args, **kwargs):  # a staged copy swapped into best/
        if armed and str(dst) == best:
            raise Killed
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(tuning_module, "load_bundle", load)
    monkeypatch.setattr(LocalFileSystem, "pipe_file", pipe)
    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(Killed):
        run(cfg)
    monkeypatch.undo()
    run(cfg)  # the rerun finds a complete best/ (or the staged copy beside it)
    bundle = load_bundle(best)
    assert bundle.config["inference"]["flip"] is True and bundle.version.endswith("+flip")


# ----------------------------------------------------------------- resume (in-process loop)
class _LoopContext(LocalContext):
    """`pipelines.train.LocalContext` over fixed in-memory batches instead of DataLoaders;
    its bundles go to a real RunLog."""

    device = torch.device("cpu")

    def __init__(self, log, train: list[dict], val: list[dict]):
        self.log, self.train, self.val = log, train, val

    def train_batches(self, epoch: int):
        return self.train

    def val_batches(self):
        return self.val

    def steps_per_epoch(self) -> int:
        return len(self.train)


def _disc_batches(n_batches: int, seed: int, size: int = 32, batch: int = 4) -> list[dict]:
    """Bright discs (the lesion) of random place and radius on noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    out = []
    for _ in range(n_batches):
        cy, cx = torch.randint(8, size - 8, (2, batch, 1, 1), generator=g)
        r = torch.randint(3, 8, (batch, 1, 1), generator=g)
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r**2).to(torch.uint8)
        noise = torch.randint(0, 100, (batch, size, size, 3), generator=g)
        image = (noise + 120 * mask[..., None]).clamp(0, 255).to(torch.uint8)
        out.append({"image": image, "mask": mask, "label": torch.zeros(batch, dtype=torch.int64)})
    return out


def _fit(tmp_path, run_name: str, spec, calls: list[dict], context=None) -> Path:
    """One `fit_stage` of `spec` (as a fresh process would run it) with a `context` class
    (default `_LoopContext`); returns its stage dir."""
    from pipelines.loop import fit_stage
    from pipelines.runlog import RunLog

    log = RunLog(str(tmp_path / "runs" / run_name), spec.stage)
    try:
        ctx = (context or _LoopContext)(log, _disc_batches(3, seed=1), _disc_batches(2, seed=2))
        fit_stage(spec, ctx)
    finally:
        log.close()
        calls.append({"end": True})
    return Path(log.stage_dir)


@pytest.fixture
def loop_spy(monkeypatch):
    """Records, at every epoch's start, the optimizer's state and LR and the augmentation
    generator's state (one list per `_fit`, split at its {"end": True})."""
    import pipelines.loop as loop

    calls: list[dict] = []
    real = loop.train_epoch

    def spy(model, batches, optimizer, loss_fn, step, **kw):
        first = optimizer.state.get(next(iter(model.parameters())), {})
        calls.append({"lr": optimizer.param_groups[0]["lr"],
                      "weight_decay": optimizer.param_groups[0]["weight_decay"],
                      "step": float(first["step"]) if "step" in first else 0.0,
                      "exp_avg": first["exp_avg"].clone() if "exp_avg" in first else None,
                      "rng": kw["generator"].get_state().clone()})
        return real(model, batches, optimizer, loss_fn, step, **kw)

    monkeypatch.setattr(loop, "train_epoch", spy)
    return calls


def _sessions(calls: list[dict]) -> list[list[dict]]:
    out, cur = [], []
    for c in calls:
        if c.get("end"):
            out.append(cur)
            cur = []
        else:
            cur.append(c)
    return out


def _loop_spec(tmp_path, **over):
    from dataclasses import replace

    from pipelines.train import stage_spec

    cfg = config(tmp_path, "train.epochs=3", "train.scheduler.warmup_fraction=0.3")
    spec = stage_spec(cfg, "segmenter")
    # augmentation on the device draws from the loop's generator, so the weights depend on it
    return replace(spec, **{"gpu_augment": dict(cfg["data"]["augment"]), "bf16": False, **over})


def test_the_fault_injection_marker_is_written_beside_the_run_on_any_filesystem():
    """With output_dir on S3 the marker went to a local `s3:/...` path in the worker's
    directory: a worker restarted on another node would not find it and fail again."""
    from types import SimpleNamespace

    import fsspec

    from pipelines.loop import _maybe_fail

    spec = SimpleNamespace(fail_at_epoch=2,
                           fail_marker="memory://medseg-fault/runs/x/.fail-segmenter")
    _maybe_fail(spec, 1)
    with pytest.raises(RuntimeError, match="marker memory://medseg-fault/runs/x/.fail-segmenter"):
        _maybe_fail(spec, 2)
    assert fsspec.filesystem("memory").exists("/medseg-fault/runs/x/.fail-segmenter")
    _maybe_fail(spec, 2)  # once


def test_resumed_training_equals_uninterrupted_training(tmp_path, loop_spy):
    from medseg_core.checkpoint import TRAIN_STATE_FILE, load_bundle, load_train_state

    spec = _loop_spec(tmp_path)
    whole = _fit(tmp_path, "whole", spec, loop_spy)
    # the same run killed at the start of epoch 2 (after epoch 1's checkpoint), then rerun
    faulty = _loop_spec(tmp_path, fail_at_epoch=2, fail_marker=str(tmp_path / ".fail"))
    with pytest.raises(RuntimeError, match="injected failure"):
        _fit(tmp_path, "resumed", faulty, loop_spy)
    saved = load_train_state(str(tmp_path / "runs" / "resumed" / "segmenter" / "latest"))
    resumed = _fit(tmp_path, "resumed", faulty, loop_spy)
    s_whole, s_first, s_rerun = _sessions(loop_spy)
    steps = 3  # batches per epoch

    assert len(s_whole) == 3 and len(s_first) == 2
    assert len(s_rerun) == 1, "the rerun trained more than the epoch it lacked"
    assert [int(float(r["epoch"])) for r in read_csv(resumed / "metrics.csv")] == [0, 1, 2]
    # the optimizer goes on from the checkpoint: its step count and moments, not zeros
    first = s_rerun[0]
    assert first["step"] == 2 * steps == s_whole[2]["step"]
    assert torch.equal(first["exp_avg"], saved["optimizer"]["state"][0]["exp_avg"])
    # the LR schedule and the augmentation random numbers are where they were
    assert first["lr"] == pytest.approx(s_whole[2]["lr"], rel=1e-12)
    assert first["lr"] != pytest.approx(s_whole[0]["lr"])
    assert torch.equal(first["rng"], s_whole[2]["rng"])
    assert not torch.equal(first["rng"], s_first[0]["rng"])
    # hence the same weights as the uninterrupted run
    a = load_bundle(str(resumed / "latest")).model.state_dict()
    b = load_bundle(str(whole / "latest")).model.state_dict()
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    # the optimizer state is kept for resuming (latest/), not in the served bundle (best/)
    assert (resumed / "latest" / TRAIN_STATE_FILE).exists()
    assert not (resumed / "best" / TRAIN_STATE_FILE).exists()


class _FirstEpochShort(_LoopContext):
    """Epoch 0 one batch short of the planned steps, as on Ray when a read task drops a bad
    record (the steps per epoch are planned from the listing)."""

    def train_batches(self, epoch: int):
        return self.train[:-1] if epoch == 0 else self.train


def test_an_epoch_short_of_its_planned_steps_leaves_the_later_epochs_schedule_as_planned(
        tmp_path, loop_spy):
    spec = _loop_spec(tmp_path)
    _fit(tmp_path, "whole", spec, loop_spy)
    _fit(tmp_path, "short", spec, loop_spy, context=_FirstEpochShort)
    s_whole, s_short = _sessions(loop_spy)

    # the short epoch took one optimizer step fewer ...
    assert [c["step"] for c in s_whole] == [0, 3, 6]
    assert [c["step"] for c in s_short] == [0, 2, 5]
    # ... and every epoch still starts at its planned point of the schedule (a resumed run
    # could not know of the missing step, so it would take another schedule otherwise)
    assert [c["lr"] for c in s_short] == pytest.approx([c["lr"] for c in s_whole], rel=1e-12)
    assert len({round(c["lr"], 12) for c in s_whole}) == 3


def test_weight_averaging_validates_and_ships_the_average_and_resumes_it_exactly(
        tmp_path, loop_spy, monkeypatch):
    import pipelines.loop as loop
    from medseg_core.checkpoint import load_bundle, load_train_state
    from medseg_core.engine import StepConfig, validate_segmenter

    decay = 0.6
    raw_steps: list[dict] = []  # the raw weights after every optimiser step of the whole run
    spied = loop.train_epoch

    def record(model, batches, optimizer, loss_fn, step, **kw):
        hook = kw["on_step"]

        def on_step(*args):
            raw_steps.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            hook(*args)
        return spied(model, batches, optimizer, loss_fn, step, **{**kw, "on_step": on_step})

    monkeypatch.setattr(loop, "train_epoch", record)
    whole = _fit(tmp_path, "whole", _loop_spec(tmp_path, ema_decay=decay), loop_spy)
    monkeypatch.setattr(loop, "train_epoch", spied)
    shipped = load_bundle(str(whole / "latest")).model
    # the average of every step's weights: the first copied, then decay * old + (1 - decay) * new
    expected = dict(raw_steps[0])
    for weights in raw_steps[1:]:
        expected = {k: decay * expected[k] + (1 - decay) * w if w.is_floating_point() else w
                    for k, w in weights.items()}
    assert len(raw_steps) == 9  # 3 epochs of 3 batches
    for key, value in shipped.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6, msg=key)
    raw = load_train_state(str(whole / "latest"))["model"]
    assert raw.keys() == shipped.state_dict().keys()
    assert not all(torch.equal(raw[k], v) for k, v in shipped.state_dict().items())
    # the epoch was chosen by the average's validation Dice, the one the bundle's weights give
    meter, _ = validate_segmenter(shipped, _disc_batches(2, seed=2), StepConfig())
    assert float(read_csv(whole / "metrics.csv")[-1]["val_dice"]) == \
        pytest.approx(meter.aggregate()["dice"], abs=1e-9)
    # killed after epoch 1 and rerun: training goes on from the raw weights, and the average
    # from where it was, so the result is the uninterrupted run's
    faulty = _loop_spec(tmp_path, ema_decay=decay, fail_at_epoch=2,
                        fail_marker=str(tmp_path / ".fail"))
    with pytest.raises(RuntimeError, match="injected failure"):
        _fit(tmp_path, "resumed", faulty, loop_spy)
    resumed = load_bundle(str(_fit(tmp_path, "resumed", faulty, loop_spy) / "latest"))
    for key, value in shipped.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=1e-5,
                                   atol=1e-6, msg=key)


def test_a_diverged_epoch_stops_the_stage_before_it_becomes_a_bundle(tmp_path, loop_spy,
                                                                     monkeypatch):
    """A NaN loss trained to the end and shipped a NaN model with exit status 0."""
    import pipelines.loop as loop

    real = loop.build_loss

    def nan_after_first_epoch(cfg):
        loss = real(cfg)
        calls = []

        def forward(logits, target):
            calls.append(1)
            value = loss(logits, target)
            return value * float("nan") if len(calls) > 3 else value  # epoch 1 (3 batches each)
        return forward

    monkeypatch.setattr(loop, "build_loss", nan_after_first_epoch)
    with pytest.raises(RuntimeError, match=r"\[segmenter\] training diverged at epoch 1: the "
                                           r"training loss is nan"):
        _fit(tmp_path, "nan", _loop_spec(tmp_path), loop_spy)
    stage_dir = tmp_path / "runs" / "nan" / "segmenter"
    assert [r["epoch"] for r in read_csv(stage_dir / "metrics.csv")] == ["0"]
    assert json.loads((stage_dir / "latest" / "metrics.json").read_text())["epoch"] == 0


def test_the_logged_lr_is_the_one_the_epoch_trained_at(tmp_path, loop_spy):
    """metrics.csv's `lr` was the next epoch's first LR (the last epoch's 0)."""
    stage_dir = _fit(tmp_path, "lr", _loop_spec(tmp_path), loop_spy)
    used = [c["lr"] for c in _sessions(loop_spy)[0]]
    assert len(used) == 3 and used[-1] > 0
    assert [float(r["lr"]) for r in read_csv(stage_dir / "metrics.csv")] == \
        pytest.approx(used, rel=1e-6)


def test_a_resume_trains_with_the_optimizer_settings_asked_for(tmp_path, loop_spy):
    """The saved optimizer state brought back the first run's weight decay (and SGD's
    momentum) over what the rerun asked for, silently; its moments stay."""
    from dataclasses import replace

    import pipelines.loop as loop

    faulty = _loop_spec(tmp_path, fail_at_epoch=2, fail_marker=str(tmp_path / ".fail"))
    with pytest.raises(RuntimeError, match="injected failure"):
        _fit(tmp_path, "wd", faulty, loop_spy)
    assert faulty.optimizer["weight_decay"] == 0.0001
    _fit(tmp_path, "wd", replace(faulty, optimizer={**faulty.optimizer, "weight_decay": 0.05}),
         loop_spy)
    rerun = _sessions(loop_spy)[1]
    assert [c["weight_decay"] for c in rerun] == [0.05]
    assert rerun[0]["exp_avg"] is not None and rerun[0]["step"] > 0  # the moments restored
    # SGD: momentum and weight decay as configured, its momentum buffers restored
    model = torch.nn.Linear(3, 1)
    first = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    model(torch.ones(2, 3)).sum().backward()
    first.step()
    second = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5, weight_decay=3e-3)
    assert loop.restore_optimizer(second, "x", {"optimizer_name": "SGD",
                                                "optimizer": first.state_dict()})
    assert (second.param_groups[0]["momentum"], second.param_groups[0]["weight_decay"]) == \
        (0.5, 3e-3)
    assert "momentum_buffer" in second.state[model.weight]


def test_the_weight_average_copies_integer_buffers_rather_than_averaging_them():
    """BatchNorm's num_batches_tracked stayed at 1 in the average (decay * n + (1 - decay) *
    m truncated); it matters to a BatchNorm with momentum=None."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from pipelines.loop import update_average

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    for _ in range(6):
        model(torch.randn(2, 1, 5, 5))
        update_average(ema, model)
    assert int(ema.module[1].num_batches_tracked) == int(model[1].num_batches_tracked) == 6
    assert not torch.equal(ema.module[1].running_mean, model[1].running_mean)  # averaged


def test_checkpoint_without_optimizer_state_resumes_with_a_fresh_optimizer(tmp_path, loop_spy):
    from medseg_core.checkpoint import TRAIN_STATE_FILE

    spec = _loop_spec(tmp_path, fail_at_epoch=2, fail_marker=str(tmp_path / ".fail"))
    with pytest.raises(RuntimeError, match="injected failure"):
        _fit(tmp_path, "old", spec, loop_spy)
    latest = tmp_path / "runs" / "old" / "segmenter" / "latest"
    (latest / TRAIN_STATE_FILE).unlink()  # as a checkpoint of an older version
    with pytest.warns(RuntimeWarning, match="optimizer starts afresh"):
        stage_dir = _fit(tmp_path, "old", spec, loop_spy)
    rerun = _sessions(loop_spy)[1]
    assert len(rerun) == 1 and rerun[0]["step"] == 0.0 and rerun[0]["exp_avg"] is None
    assert [int(float(r["epoch"])) for r in read_csv(stage_dir / "metrics.csv")] == [0, 1, 2]
    assert (stage_dir / "latest" / TRAIN_STATE_FILE).exists()


class _SpyClassifier(torch.nn.Module):
    """Records the masks it is given; constant logits with one trainable parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(3))
        self.seen: list[torch.Tensor] = []

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.seen.append(mask.detach().clone())
        return self.bias.expand(image.shape[0], 3) + 0 * image.mean()


class _EverywhereSegmenter(torch.nn.Module):
    """Logits of a lesion everywhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x[:, :1], 10.0)


def _seen_masks(prob: float, mask_model: torch.nn.Module | None, validate: bool = False):
    from medseg_core.engine import FrozenSegmenter, StepConfig, train_epoch, validate_classifier

    batches = [{"image": torch.randint(0, 255, (16, 8, 8, 3), dtype=torch.uint8),
                "mask": torch.zeros(16, 8, 8, dtype=torch.uint8),
                "label": torch.randint(0, 3, (16,))} for _ in range(4)]
    model = _SpyClassifier()
    step = StepConfig(mask_model=mask_model and FrozenSegmenter(mask_model), mask_prob=prob)
    if validate:
        validate_classifier(model, batches, step, num_classes=3)
    else:
        train_epoch(model, batches, torch.optim.SGD(model.parameters(), lr=0.1),
                    torch.nn.CrossEntropyLoss(), step, task="classification",
                    generator=torch.Generator().manual_seed(0))
    # per sample: 1.0 where the segmenter's mask was used, 0.0 where the (empty) truth was
    return torch.cat([m.flatten(1).mean(1) for m in model.seen])


def test_classifier_trains_on_the_fraction_of_predicted_masks_asked_for():
    full = _EverywhereSegmenter()
    assert set(_seen_masks(1.0, full).tolist()) == {1.0}
    assert set(_seen_masks(0.0, full).tolist()) == {0.0}
    assert set(_seen_masks(1.0, None).tolist()) == {0.0}
    mixed = _seen_masks(0.5, full)
    assert set(mixed.tolist()) == {0.0, 1.0}  # whole samples swapped, both kinds present
    assert 0.25 < float(mixed.mean()) < 0.75, mixed
    # validation sees the segmenter's masks whenever one is given, the truth otherwise
    assert set(_seen_masks(0.0, full, validate=True).tolist()) == {1.0}
    assert set(_seen_masks(0.0, None, validate=True).tolist()) == {0.0}


def _median_segmenter(folder: Path, images: np.ndarray, flip: bool, largest: bool) -> str:
    """A random U-Net bundle thresholded at the median of its probabilities on `images`, so
    its masks hold several components, with the given post-processing."""
    from medseg_core.checkpoint import load_bundle, save_bundle
    from medseg_core.inference import Segmenter
    from medseg_core.models import build_model

    torch.manual_seed(3)
    spec = {"name": "unet", "widths": [4, 8]}
    cfg = {"task": "segmentation", "input_size": [32, 32], "in_channels": 3, "mean": [0.5] * 3,
           "std": [0.25] * 3, "threshold": 0.5, "class_names": None,
           "inference": {"mode": "resize", "flip": flip, "keep_largest": largest}}
    uri = save_bundle(str(folder), build_model(spec), {"model": spec, **cfg})
    probs = np.stack(Segmenter(load_bundle(uri), "cpu", 8).predict_proba(list(images)))
    return save_bundle(str(folder), load_bundle(uri).model,
                       {"model": spec, **cfg, "threshold": float(np.median(probs))})


@pytest.mark.parametrize("flip,largest", [(False, False), (True, True)])
def test_the_classifier_stage_sees_the_masks_the_chain_makes(tmp_path, flip, largest):
    """Predicted training masks follow the segmenter bundle's threshold, flip and
    keep_largest, as `Segmenter` (the chain) makes them; they thresholded the raw logits at
    train.threshold."""
    from medseg_core.checkpoint import load_bundle
    from medseg_core.engine import StepConfig, _inputs, predicted_masks
    from medseg_core.inference import Segmenter
    from pipelines.loop import load_mask_segmenter
    from pipelines.train import stage_spec

    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    seg = _median_segmenter(tmp_path / "seg", images, flip, largest)
    spec = stage_spec(config(tmp_path, f"train.classifier_masks.segmenter={seg}",
                             "train.classifier_masks.predicted=1.0", "data.mean=[0.5,0.5,0.5]",
                             "data.std=[0.25,0.25,0.25]"), "classifier")
    frozen = load_mask_segmenter(spec, torch.device("cpu"))
    step = StepConfig(mean=(0.5,) * 3, std=(0.25,) * 3, mask_model=frozen)
    x, _, _ = _inputs({"image": torch.from_numpy(images),
                       "mask": torch.zeros(4, 32, 32, dtype=torch.uint8)}, step)
    got = predicted_masks(x, step)[:, 0].numpy().astype(np.uint8)
    want = np.stack(Segmenter(load_bundle(seg), "cpu", 8).predict(list(images)))
    assert 0.2 < want.mean() < 0.8, want.mean()  # neither empty nor full
    np.testing.assert_array_equal(got, want)


def test_the_classifier_trains_on_the_segmenter_post_processed_as_chosen(tmp_path, monkeypatch):
    """The post-processing is chosen right after the segmenter stage, so the classifier stage
    (here on predicted masks) loads the bundle with it; it was chosen after both stages."""
    import pipelines.loop as loop

    seen = []
    real = loop.load_mask_segmenter
    monkeypatch.setattr(loop, "load_mask_segmenter",
                        lambda spec, device: seen.append(real(spec, device)) or seen[-1])
    from pipelines.train import run

    run(config(tmp_path, "trainer=local", "train.epochs=1", "train.classifier_epochs=1",
               "run_name=order", "train.postprocess=flip+largest",
               "train.classifier_masks.predicted=1.0"))
    assert [(s.flip, s.keep_largest) for s in seen] == [(True, True)]


def test_classifier_masks_settings_are_checked(tmp_path):
    from medseg_core.checkpoint import BundleError
    from pipelines.train import run, stage_spec

    with pytest.raises(ValueError, match="predicted must be in"):
        stage_spec(config(tmp_path, "train.classifier_masks.predicted=1.5"), "classifier")
    with pytest.raises(ValueError, match="truth or predicted"):
        stage_spec(config(tmp_path, "train.classifier_masks.validate=segmenter"), "classifier")
    # the classifier stage alone, asked for predicted masks, with no segmenter trained yet
    cfg = config(tmp_path, "trainer=local", "stages=[classifier]", "run_name=alone",
                 "train.classifier_masks.validate=predicted")
    with pytest.raises(BundleError, match="train the segmenter stage first"):
        run(cfg)


# ----------------------------------------------------------------- atomic bundle updates
class _Killed(BaseException):
    """Stands in for the process being killed between two filesystem operations."""


def _epoch_bundle(root: Path, epoch: int) -> str:
    from medseg_core.checkpoint import make_bundle_config, save_bundle, save_train_state
    from medseg_core.models import build_model

    model_cfg = {"name": "unet_bn", "widths": [4, 8], "in_channels": 3}
    cfg = make_bundle_config(model_cfg, task="segmentation", input_size=(16, 16),
                             mean=(0.5,) * 3, std=(0.25,) * 3)
    path = str(root / f"e{epoch}")
    save_train_state(path, {"optimizer": {"state": {}, "param_groups": []}})
    return save_bundle(path, build_model(model_cfg), cfg,
                       metrics={"train_state": {"epoch": epoch}}, version=f"e{epoch}")


def _operations(fs) -> list[tuple[object, str]]:
    """The filesystem operations `copy_dir` may be killed between, for `fs`."""
    import os
    import shutil

    from fsspec.implementations.local import LocalFileSystem

    ops = [(fs, "put_file"), (fs, "rm")]
    return ops + [(os, "rename"), (shutil, "rmtree")] if isinstance(fs, LocalFileSystem) else ops


def _copy_killed_at(monkeypatch, src: str, dst: str, kill_at: int | None, exclude=()) -> int:
    """`copy_dir(src, dst)`, killed before its `kill_at`-th operation (None: not killed);
    returns how many operations ran."""
    import fsspec

    from pipelines.runlog import copy_dir

    fs, _ = fsspec.core.url_to_fs(dst)
    done = [0]
    with monkeypatch.context() as m:
        for owner, name in _operations(fs):
            real = getattr(owner, name)

            def op(*args, _real=real, **kwargs):
                if done[0] + 1 == kill_at:
                    raise _Killed
                done[0] += 1
                return _real(*args, **kwargs)

            m.setattr(owner, name, op)
        try:
            copy_dir(src, dst, exclude=exclude)
        except _Killed:
            pass
    return done[0]


@pytest.mark.parametrize("where", ["local", "memory", pytest.param("s3", marks=pytest.mark.s3)])
@pytest.mark.parametrize("target", ["latest", "best"])
def test_a_kill_while_replacing_a_bundle_leaves_one_to_resume_from(tmp_path, monkeypatch, request,
                                                                   where, target):
    import uuid

    from medseg_core.checkpoint import TRAIN_STATE_FILE, load_bundle
    from pipelines.runlog import RunLog, exists, join

    old, new = _epoch_bundle(tmp_path, 2), _epoch_bundle(tmp_path, 3)
    exclude = (TRAIN_STATE_FILE,) if target == "best" else ()
    runs = {"local": str(tmp_path / "runs"), "memory": f"memory://runs-{uuid.uuid4().hex}",
            "s3": f"s3://medseg-runlog/runs-{uuid.uuid4().hex}"}[where]
    if where == "s3":
        server = request.getfixturevalue("s3")
        server.create_bucket("medseg-runlog")
        for key, value in server.env.items():
            monkeypatch.setenv(key, value)

    def fresh(name: str) -> RunLog:
        log = RunLog(join(runs, name), "segmenter")
        _copy_killed_at(monkeypatch, old, getattr(log, target), None, exclude)
        return log

    total = _copy_killed_at(monkeypatch, new, getattr(fresh("count"), target), None, exclude)
    assert total >= 4
    seen = []
    for kill_at in range(1, total + 1):
        log = fresh(f"kill{kill_at}")
        _copy_killed_at(monkeypatch, new, getattr(log, target), kill_at, exclude)
        # as a rerun starts: latest/ (and best/) must hold the old or the new bundle
        latest = log.resume_dir()
        if target == "latest":
            assert latest == log.latest, f"no bundle to resume from after a kill at {kill_at}"
            assert log.resume_epoch() in (3, 4)
        assert exists(join(getattr(log, target), "version")), kill_at
        version = load_bundle(getattr(log, target)).version
        assert exists(join(getattr(log, target), TRAIN_STATE_FILE)) == (target == "latest")
        seen.append(version)
        # and the next update goes through
        _copy_killed_at(monkeypatch, new, getattr(log, target), None, exclude)
        assert load_bundle(getattr(log, target)).version == "e3"
        assert _dirs_with_files(log.stage_dir) == {target}
    # old until the new bundle is complete, then new: never back to the old one
    assert seen == sorted(seen) and seen[0] == "e2", seen


def _dirs_with_files(url: str) -> set[str]:
    """The directories of `url` holding files (SeaweedFS lists emptied ones too)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    return {f[len(path.rstrip("/")) + 1:].split("/", 1)[0] for f in fs.find(path)}


def test_local_trainer_shuffles_each_epoch_by_its_number(tmp_path):
    """A resumed in-process run sees the epoch's own order, not epoch 0's again."""
    from pipelines.data import load_splits
    from pipelines.runlog import RunLog
    from pipelines.train import LocalContext

    cfg = config(tmp_path, "trainer=local")
    splits = load_splits(cfg)

    def order(ctx, epoch: int) -> list[list[int]]:
        ctx.train_batches(epoch)
        return [list(b) for b in ctx.train_loader.batch_sampler]

    log = RunLog(str(tmp_path / "runs" / "shuffle"), "segmenter")
    fresh, going = LocalContext(cfg, splits, log), LocalContext(cfg, splits, log)
    seen = [order(going, e) for e in range(3)]
    assert order(fresh, 2) == seen[2]         # as a run resumed at epoch 2 sees it
    assert seen[0] != seen[1] != seen[2]      # and still a new order every epoch
    # data.shuffle=false: the same order every epoch, the records' own
    still = LocalContext(config(tmp_path, "trainer=local", "data.shuffle=false"), splits, log)
    assert order(still, 0) == order(still, 1)
    assert sum(order(still, 0), []) == sorted(sum(order(still, 0), []))
    log.close()


def test_settings_are_refused_before_any_data_is_read(tmp_path):
    from pipelines.train import run

    for bad, message in (("stages=[segmenter,clasifier]", "stages must be"),
                         ("stages=segmenter", "stages must be"),
                         ("train.postprocess=larges", "train.postprocess must be"),
                         ("trainer.backend=dask", "unknown trainer.backend"),
                         ("data.split.mode=kfld", "data.split.mode must be"),
                         # found only when warm-up ended, or never
                         ("train.scheduler.schedule=cosin", "schedule must be one of"),
                         ("train.scheduler.warmup_fraction=2.0", "warmup_fraction must be"),
                         ("train.scheduler.power=-0.9", "power must be > 0"),
                         ("+train.scheduler.warmup_steps=-1", "warmup_steps must be"),
                         ("train.grad_clip=-1.0", "grad_clip must be > 0"),
                         # accepted, then a NaN, inverted or frozen model trained to the end,
                         # or the key ignored
                         ("train.loss.bce_weight=nan", "bce_weight must be a finite number"),
                         ("train.loss.dice_weight=-1", "dice_weight must be >= 0"),
                         ("train.classifier_loss.label_smoothing=2", "label_smoothing must be in"),
                         ("train.scheduler.power=inf", "power must be > 0 and finite"),
                         ("+train.scheduler.min_factor=0.5", r"unknown key\(s\) \['min_factor'\]"),
                         ("+train.optimizer.betas=[0.9,0.9]", r"unknown key\(s\) \['betas'\]"),
                         ("+data.augment.bogus=1", r"unknown augmentation key\(s\) \['bogus'\]"),
                         ("+trainer.fail_at_epoch.segmentr=3", "segmentr: no such stage"),
                         # failed after listing, the classifier's once the segmenter had
                         # trained
                         ("classifier.dropout=5", "classifier: dropout probability has to be"),
                         ("classifier.name=unet", "classifier: bad config for model 'unet'"),
                         ("model.out_channels=2", "model.out_channels must be 1"),
                         ("trainer=local trainer.device=bogus", "trainer.device must be auto"),
                         ("trainer=local trainer.device=cuda:63",
                          r"trainer.device=cuda:63, but torch sees \d+ CUDA device\(s\)"),
                         # every file dropped, or every mask read empty
                         ("data.max_bytes=0", "data.max_bytes must be a whole number >= 1"),
                         ("data.mask_threshold=300", "data.mask_threshold must be a whole number"),
                         ("train.threshold=1.5", "train.threshold must be strictly"),
                         ("train.threshold=abc", "train.threshold must be strictly"),
                         # a NaN model trained to the end; the others failed after listing,
                         # naming no setting (image_size: "data.augment: size ...")
                         ("data.std=[0,0,0]", r"data.std must be > 0"),
                         ("data.mean=[0.5,0.5]", r"data.mean must be a list of 1 or "
                          r"data.channels=3 numbers"),
                         ("data.channels=2 model.in_channels=2", "data.channels must be 1"),
                         ("data.image_size=[0,0]", r"data.image_size must be \[height, width\]"),
                         ("data.image_size=[100000,100000]", "over data.max_pixels"),
                         # a bundle every predictor refused, once the stage had trained
                         ("+data.inference.mode=tiles", "data.inference.mode must be one of"),
                         ("+data.inference.tile_overlap=-8", "tile_overlap must be a number"),
                         ("+data.inference.overlap=8", "data.inference takes mode"),
                         ("+data.report_storage_options.secret=s",
                          r"data.report_storage_options.secret: credentials must not be"),
                         ("train.epochs=0", "train.epochs must be a whole number >= 1"),
                         ("train.classifier_epochs=0", "train.classifier_epochs must be"),
                         ("train.early_stopping_patience=-3", "early_stopping_patience must"),
                         ("train.ema_decay=1.0", "train.ema_decay must be in"),
                         ("data.augment.scale=[1.1,0.9]", r"data.augment: scale must be a "
                          r"number in \[0, 1\) or a range"),
                         ("data.augment.scale=[0.9]", r"data.augment: scale must be a number "
                          r"or a range \[low, high\], got \[0.9\]"),
                         # a bare TypeError, naming no setting
                         ("data.augment.rotate=[-10,10]", r"data.augment: rotate must be a "
                          r"number, got \[-10, 10\]"),
                         ("data.augment.hflip=[0.5]", r"data.augment: hflip must be a number"),
                         # passed, then switched the step off or inverted images
                         ("data.augment.hflip=2", r"data.augment: hflip is a probability"),
                         ("data.augment.contrast=-0.5", r"data.augment: contrast must be in"),
                         ("data.augment.contrast=5", r"data.augment: contrast must be in"),
                         ("data.augment.shift=-0.3", r"data.augment: shift must be in"),
                         ("data.augment.rotate=-5", r"data.augment: rotate must be in \[0, 180\]"),
                         ("data.split.ratios=[0.9,0,0.1]", "validation split no share"),
                         # failed after listing, naming `fold` or `ratios` alone
                         ("data.split.mode=kfold data.split.fold=5",
                          "data.split.fold must be a whole number from 0 to 4, got 5"),
                         ("data.split.ratios=[0.8,0.2]", "data.split.ratios must be three"),
                         # crashed on the first classifier batch, after the whole segmenter
                         ("classifier.num_classes=7", "classifier.num_classes=7 but"),
                         ("data.channels=1 data.mean=[0.5] data.std=[0.25]",
                          "model.in_channels=3 but data.channels=1"),
                         ("data.class_names=[]", "the classifier stage needs labelled data"),
                         # a division by zero after listing; Ray's or torch's errors, named
                         # after none of these settings, after reading the archive
                         ("trainer=ray trainer.num_workers=0", "trainer.num_workers must be"),
                         ("trainer=ray trainer.cpus_per_worker=0", "cpus_per_worker=0 without"),
                         ("trainer=ray trainer.max_failures=abc", "trainer.max_failures must"),
                         ("trainer=ray trainer.num_to_keep=0", "trainer.num_to_keep must be"),
                         ("trainer=local trainer.loader_workers=-1", "trainer.loader_workers must be"),
                         ("train.batch_size=0", "train.batch_size must be"),
                         ("train.eval_batch_size=0", "train.eval_batch_size must be"),
                         ("train.optimizer.lr=-1", "train.optimizer.lr must be > 0"),
                         ("train.classifier_optimizer.lr=abc",
                          "train.classifier_optimizer.lr must be a number"),
                         ("train.optimizer.name=adam", "unknown train.optimizer.name 'adam'"),
                         ("train.classifier_loss.name=focal", "train.classifier_loss: unknown"),
                         # the defaults are dice_bce's: say how to drop them
                         ("train.loss.name=dice", r"for loss 'dice'.* \(remove them with "
                          r"`~train.loss.bce_weight ~train.loss.dice_weight`\)"),
                         ("seed=abc", "seed must be a whole number"),
                         # silently taken as 1, and a cap of 0 tasks
                         ("data.read.batch_size=0", "data.read.batch_size must be"),
                         ("data.read.read_ahead=0", "data.read.read_ahead must be")):
        # the archive does not exist: reading it would fail with another error
        cfg = config(tmp_path, *bad.split(), f"data.url={tmp_path / 'nothing'}")
        with pytest.raises(ValueError, match=message):
            run(cfg)
        assert not (tmp_path / "runs").exists(), bad


def test_worker_settings_of_ray_training_are_refused_for_in_process_training(tmp_path):
    """trainer=local trains in this process: `trainer.num_workers` was accepted there and did
    nothing."""
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="num_workers"):
        config(tmp_path, "trainer=local", "trainer.num_workers=4")
    assert config(tmp_path, "trainer=ray", "trainer.num_workers=4")["trainer"]["num_workers"] == 4


def test_a_kill_between_the_best_and_latest_copies_keeps_them_consistent(tmp_path, monkeypatch):
    """latest/ records the best score so far; best/ is written first, so no kill leaves a
    latest/ that claims a best bundle best/ does not hold."""
    import pipelines.runlog as runlog
    from medseg_core.checkpoint import load_bundle, save_bundle
    from medseg_core.models import build_model

    model = build_model({"name": "unet", "widths": [4, 8]})

    def bundle(epoch: int, dice: float) -> tuple[str, dict]:
        m = {"epoch": float(epoch), "val_dice": dice, "is_best": 1.0}
        d = str(tmp_path / f"b{epoch}")
        save_bundle(d, model, {"model": {"name": "unet", "widths": [4, 8]}, "task":
                               "segmentation", "input_size": [8, 8], "in_channels": 3,
                               "mean": [0.5] * 3, "std": [0.5] * 3, "threshold": 0.5,
                               "class_names": None, "inference": {}},
                    metrics={**m, "train_state": {"epoch": epoch, "best": dice}},
                    version=f"e{epoch}")
        return d, m

    log = runlog.RunLog(str(tmp_path / "run"), "segmenter")
    d, m = bundle(0, 0.5)
    log.record(m, d, [m])
    real = runlog.copy_dir
    for victim in ("best", "latest"):  # a kill before each of the two copies of epoch 1
        def killed(src, dst, exclude=(), victim=victim):
            if dst.rstrip("/").endswith(victim):
                raise KeyboardInterrupt
            real(src, dst, exclude)
        monkeypatch.setattr(runlog, "copy_dir", killed)
        d, m = bundle(1, 0.7)
        with pytest.raises(KeyboardInterrupt):
            log.record(m, d, [m])
        latest = load_bundle(log.resume_dir())
        assert load_bundle(log.best).metrics["val_dice"] >= latest.metrics["train_state"]["best"]
    log.close()


def test_local_training_drops_a_record_with_a_bad_mask(tmp_path, synthetic_archive):
    """trainer=local reads records in a DataLoader, which cannot drop one: they are checked
    before the split, even with near-duplicate grouping off, and the report names the file."""
    import json
    import shutil

    from pipelines.data import load_splits

    arc = tmp_path / "arc"
    shutil.copytree(synthetic_archive, arc)
    (arc / "benign" / "benign (2)_mask.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    cfg = config(tmp_path, "trainer=local", f"data.url={arc}", "data.split.dedup_distance=-1",
                 "stages=[segmenter]", "train.epochs=1", "run_name=badmask")
    with pytest.warns(UserWarning, match=r"benign \(2\)_mask\.png"):
        splits = load_splits(cfg, check=True)
    assert "benign/benign (2)" not in {r.id for v in splits.values() for r in v}
    assert sum(len(v) for v in splits.values()) == 14
    # the split of the listing, as Ray's tasks and evaluation (unchecked) split it: the bad
    # record leaves its split, the others stay where they are
    unchecked = load_splits(cfg)
    assert {k: [r.id for r in v if r.id != "benign/benign (2)"] for k, v in unchecked.items()} \
        == {k: [r.id for r in v] for k, v in splits.items()}
    from pipelines.train import run

    with pytest.warns(UserWarning, match=r"benign \(2\)_mask\.png"):
        run(cfg)
    report = json.loads(Path(cfg["data"]["report"]).read_text())
    assert report["dropped"] == 1 and report["entries"][0]["path"].endswith("benign (2)_mask.png")
    # a start under trainer=ray records its splits as listed, the bad record in one of them:
    # going on in-process (the trainer may change between runs) is no "archive changed"...
    import warnings

    from pipelines.runlog import record_splits

    record_splits(str(tmp_path / "runs" / "badmask"),
                  {k: [r.id for r in v] for k, v in unchecked.items()}, replace=True)
    more = config(tmp_path, "trainer=local", f"data.url={arc}", "data.split.dedup_distance=-1",
                  "stages=[segmenter]", "train.epochs=2", "run_name=badmask")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(more)
    assert not [w for w in caught if "now hold other records" in str(w.message)]
    # ...while an archive that lost an image is
    for name in ("benign (3).png", "benign (3)_mask.png"):
        (arc / "benign" / name).unlink()
    with pytest.warns(UserWarning, match="now hold other records than when the run started"):
        run(config(tmp_path, "trainer=local", f"data.url={arc}", "data.split.dedup_distance=-1",
                   "stages=[segmenter]", "train.epochs=3", "run_name=badmask"))


def test_warmup_steps_zero_means_no_warm_up():
    from medseg_core.engine import build_scheduler

    for cfg, first in (({"schedule": "constant", "warmup_steps": 0, "warmup_fraction": 0.5}, 1.0),
                       ({"schedule": "constant", "warmup_fraction": 0.5}, 0.1)):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        build_scheduler(opt, cfg, total_steps=20)
        assert opt.param_groups[0]["lr"] == pytest.approx(first), cfg


def test_an_empty_validation_split_is_refused(tmp_path):
    from pipelines.train import run

    # one image per class: nothing is left for validation
    with pytest.raises(ValueError, match="the validation split is empty"):
        run(config(tmp_path, "trainer=local", "data.generate.n_per_class=1"))
    assert not (tmp_path / "runs").exists()


def test_a_restarted_worker_group_gets_the_resume_epochs_augmentation(tmp_path, ray_cluster):
    """Ray Train builds the train Dataset at every worker-group start: after a failure the
    rebuilt Dataset's first pass is the augmentation epoch the loop resumes at, not epoch 0."""
    from medseg_core.checkpoint import save_bundle
    from medseg_core.models import build_model
    from pipelines.data import load_splits, train_epoch_dataset
    from pipelines.runlog import RunLog
    from pipelines.train import run_dir
    from pipelines.train_ray import resumed_train_dataset

    cfg = config(tmp_path, "trainer=ray", "run_name=restart", "data.generate.n_per_class=4",
                 "data.shuffle=false")
    records = load_splits(cfg)["train"]
    build = resumed_train_dataset(cfg, "segmenter", records)

    def first_pass(ds) -> set[bytes]:
        return {im.tobytes() for b in ds.iter_batches(batch_size=64, batch_format="numpy")
                for im in b["image"]}

    first = build()
    assert first_pass(first) == first_pass(train_epoch_dataset(first, 0))
    # epochs 0 and 1 done, as a worker reports them before failing in epoch 2
    spec = {"name": "unet", "widths": [4, 8]}
    bundle = save_bundle(str(tmp_path / "e1"), build_model(spec), {
        "model": spec, "task": "segmentation", "input_size": [64, 64], "in_channels": 3,
        "mean": [0.5] * 3, "std": [0.5] * 3, "threshold": 0.5, "class_names": None,
        "inference": {}}, metrics={"train_state": {"epoch": 1, "best": 0.5}})
    log = RunLog(run_dir(cfg), "segmenter")
    log.record({"epoch": 1.0, "val_dice": 0.5, "is_best": 1.0}, bundle, [])
    log.close()
    restarted = build()
    seen = first_pass(restarted)
    assert seen == first_pass(train_epoch_dataset(restarted, 2))
    assert seen != first_pass(train_epoch_dataset(restarted, 0))


@pytest.mark.s3
@pytest.mark.ray
def test_the_train_dataset_factory_reads_with_the_drivers_credentials(tmp_path, s3, ray_cluster,
                                                                       synthetic_archive,
                                                                       monkeypatch):
    """Ray Train calls the factory in its controller actor: the credentials it hands the read
    tasks are the driver's, taken when the factory was made, not that process's (none)."""
    import ray

    from pipelines.data import data_report, load_splits
    from pipelines.train_ray import resumed_train_dataset

    s3.create_bucket("medseg-factory")
    s3.upload_dir(synthetic_archive, "s3://medseg-factory/synthetic")
    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.env["AWS_ACCESS_KEY_ID"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.env["AWS_SECRET_ACCESS_KEY"])
    cfg = config(tmp_path, "data.url=s3://medseg-factory/synthetic", "run_name=factory",
                 f"data.endpoint_url={s3.endpoint}", "data.region=us-east-1")
    records = load_splits(cfg)["train"]
    build = resumed_train_dataset(cfg, "segmenter", records)

    @ray.remote(num_cpus=0)
    def in_another_process(factory):
        import os

        assert "AWS_SECRET_ACCESS_KEY" not in os.environ  # as in Ray Train's controller
        return factory()

    ds = ray.get(in_another_process.remote(build))
    assert ds.count() == len(records)
    assert data_report(cfg, warn=False)["dropped"] == 0


def test_the_classifier_stage_without_labels_is_refused_before_training(tmp_path,
                                                                         synthetic_archive):
    """An image folder with no labels CSV labels every record -1 (unknown): a classifier stage
    on no label was found only after the segmenter stage had trained."""
    import shutil

    from pipelines.train import run

    folder = tmp_path / "folder"
    for f in Path(synthetic_archive).glob("*/*.png"):
        sub = "masks" if f.stem.endswith("_mask") else "images"
        (folder / sub).mkdir(parents=True, exist_ok=True)
        name = f"{f.parent.name}-{f.stem.removesuffix('_mask')}.png"
        shutil.copy(f, folder / sub / name)
    with pytest.raises(ValueError, match="the classifier stage needs labelled records"):
        run(load_config([f"output_dir={tmp_path}", "data=folder", f"data.url={folder}",
                         "trainer=local"]))
    assert not (tmp_path / "runs").exists()


def test_optimizer_settings_name_the_bad_key():
    from medseg_core.engine import build_optimizer, optimizer_settings

    model = torch.nn.Linear(2, 1)
    opt = build_optimizer(model, {"name": "SGD", "lr": 0.1, "weight_decay": 0, "momentum": 0.9})
    assert isinstance(opt, torch.optim.SGD)
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["nesterov"]
    assert optimizer_settings({})["name"] == "adamw"  # the defaults are valid
    for bad, message in (({"lr": 0}, "opt.lr must be > 0"),
                         ({"lr": float("nan")}, "opt.lr must be a number"),
                         ({"lr": True}, "opt.lr must be a number"),
                         ({"weight_decay": -0.1}, "opt.weight_decay must be >= 0"),
                         ({"name": "sgd", "momentum": 0}, r"opt.momentum must be in \(0, 1\)"),
                         ({"name": "lamb"}, "unknown opt.name 'lamb'")):
        with pytest.raises(ValueError, match=message):
            optimizer_settings(bad, "opt")


@pytest.mark.parametrize("native", [True, False])
def test_cpu_bf16_trains_in_bf16_only_on_a_cpu_with_native_bf16(tmp_path, monkeypatch,
                                                                 fake_native_bf16, native):
    """`trainer.cpu_bf16`: autocast to bf16 on a CPU whose instructions compute it (there it
    trained the CPU preset 1.6x faster); elsewhere emulated bf16 is slower than float32, so the
    loop warns and stays in float32. `trainer.bf16` alone never changes CPU training."""
    import warnings

    import pipelines.loop as loop
    from medseg_core.precision import amp_dtype

    fake_native_bf16(native)
    assert amp_dtype("cpu", gpu=True, cpu=False) is None
    assert amp_dtype("cpu", gpu=False, cpu=True) == (torch.bfloat16 if native else None)

    seen: list[tuple] = []  # (the step's autocast dtype, the dtype the first conv computed in)
    real = loop.train_epoch

    def spy(model, batches, optimizer, loss_fn, step, **kw):
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        dtypes: list[torch.dtype] = []
        hook = conv.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
        try:
            result = real(model, batches, optimizer, loss_fn, step, **kw)
        finally:
            hook.remove()
        seen.append((step.amp_dtype, set(dtypes)))
        return result

    monkeypatch.setattr(loop, "train_epoch", spy)
    for cpu_bf16 in (False, True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            stage = _fit(tmp_path, f"bf16-{cpu_bf16}", _loop_spec(tmp_path, cpu_bf16=cpu_bf16,
                                                               bf16=True), [])
        warned = [w for w in caught if "no native bf16" in str(w.message)]
        assert len(warned) == (1 if cpu_bf16 and not native else 0)
        rows = read_csv(stage / "metrics.csv")
        assert len(rows) == 3 and all(np.isfinite(float(r["train_loss"])) for r in rows)
    bf16 = torch.bfloat16 if native else None
    assert seen == [(None, {torch.float32})] * 3 + [(bf16, {bf16 or torch.float32})] * 3


def test_precision_switches_must_be_true_or_false(tmp_path):
    from pipelines.train import run

    for bad in ("trainer.cpu_bf16=abc", "trainer=ray trainer.bf16=1",
                "trainer=ray trainer.channels_last=abc"):
        key = bad.split()[-1].split("=")[0]
        with pytest.raises(ValueError, match=f"{key} must be true or false"):
            # refused where the settings are read, since every true/false setting is checked
            run(config(tmp_path, *bad.split(), f"data.url={tmp_path / 'nothing'}"))
        assert not (tmp_path / "runs").exists(), bad


def test_num_to_keep_null_keeps_every_ray_checkpoint():
    """`trainer.num_to_keep: null` passes the settings check (Ray reads None as "keep all"),
    and then crashed the run with int(None) after the archive was listed."""
    from ray.train import CheckpointConfig

    from pipelines.train import check_settings
    from pipelines.train_ray import keep_checkpoints

    check_settings(load_config(["trainer=ray", "trainer.num_to_keep=null"]))
    assert CheckpointConfig(num_to_keep=keep_checkpoints({"num_to_keep": None})).num_to_keep is None
    assert keep_checkpoints({}) == 2 and keep_checkpoints({"num_to_keep": 5}) == 5


def test_the_segmenter_stage_runs_first_whatever_the_order_asked(tmp_path, capsys):
    """`stages=[classifier,segmenter]` trained the classifier first: its mask clearing
    (`train.clear_masks=auto`), chosen through the chain on validation, found no segmenter
    and was skipped without a word, for good."""
    from pipelines.train import run

    run(config(tmp_path, "trainer=local", "stages=[classifier,segmenter]", "train.epochs=1",
               "train.classifier_epochs=1", "train.clear_masks=auto"))
    out = capsys.readouterr().out
    order = [out.index(f"[{stage}] training in-process") for stage in ("segmenter", "classifier")]
    assert order == sorted(order)
    assert "[clear masks] validation Dice through the chain" in out


def test_an_archive_url_is_the_same_with_or_without_a_trailing_slash(tmp_path):
    """A URL's trailing slash stayed in `training_data` (a local path's did not): a rerun naming
    the same bucket prefix with or without it was refused as other data. Likewise the k-fold
    keys of a ratio split, which bundles recorded before."""
    import yaml

    from pipelines.train import check_resumable, run, training_data

    base = ["trainer=local", "stages=[segmenter]", "train.epochs=1", "run_name=slash"]
    run(config(tmp_path, *base))
    url = "s3://bucket/busi"
    assert training_data(config(tmp_path, f"data.url={url}/"))["url"] == url
    latest = tmp_path / "runs" / "slash" / "segmenter" / "latest" / "config.yaml"
    meta = yaml.safe_load(latest.read_text())
    meta["training_data"]["url"] = url + "/"  # as bundles recorded it before
    assert "n_folds" not in meta["training_data"]["split"]
    meta["training_data"]["split"].update(n_folds=5, fold=0)  # and the unused k-fold keys
    latest.write_text(yaml.safe_dump(meta, sort_keys=False))
    for named in (url, url + "/"):
        check_resumable(config(tmp_path, *base, f"data.url={named}"))
    check_resumable(config(tmp_path, *base, f"data.url={url}", "data.split.n_folds=3"))
    with pytest.raises(ValueError, match=r"training_data\.url differ"):
        check_resumable(config(tmp_path, *base, "data.url=s3://bucket/other"))
    with pytest.raises(ValueError, match=r"training_data\.split differ"):
        check_resumable(config(tmp_path, *base, f"data.url={url}", "data.split.mode=kfold"))


def test_a_finished_stage_keeps_its_inference_choice_when_the_archive_changed(tmp_path, capsys):
    """A rerun of a finished run after the archive changed warned so, skipped the stage, and
    then chose the segmenter's post-processing again on the new validation split, rewriting
    the shipped `best/` bundle (its version and options) that training had scored."""
    import shutil
    import warnings

    import yaml

    from pipelines.data import ensure_dataset
    from pipelines.train import run

    base = ["trainer=local", "stages=[segmenter]", "train.epochs=1", "run_name=kept"]
    cfg = config(tmp_path, *base)
    run(cfg)
    best = tmp_path / "runs" / "kept" / "segmenter" / "best"
    before = {p.name: p.read_bytes() for p in best.iterdir()}
    archive = Path(ensure_dataset(cfg["data"]))
    for suffix in ("", "_mask"):  # one more normal image: every split may change
        shutil.copy(archive / "normal" / f"normal (1){suffix}.png",
                    archive / "normal" / f"normal (99){suffix}.png")
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the archive changed", as intended
        run(config(tmp_path, *base))
    out = capsys.readouterr().out
    assert "[segmenter] finished before the splits changed: its inference choices stay" in out
    assert "[postprocess]" not in out
    assert {p.name: p.read_bytes() for p in best.iterdir()} == before
    # a setting the rerun names is chosen on no split: it applies, as on an unchanged archive
    for suffix in ("", "_mask"):
        shutil.copy(archive / "normal" / f"normal (1){suffix}.png",
                    archive / "normal" / f"normal (98){suffix}.png")
    def options() -> tuple[bool, bool]:
        inference = yaml.safe_load((best / "config.yaml").read_text())["inference"]
        return bool(inference.get("flip")), bool(inference.get("keep_largest"))

    named = "none" if any(options()) else "flip+largest"  # not what was chosen
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(config(tmp_path, *base, f"train.postprocess={named}"))
    assert any("the archive changed" in str(w.message) for w in caught)
    assert options() == ((False, False) if named == "none" else (True, True))


def test_a_ray_run_on_a_joined_cluster_refuses_an_output_dir_its_workers_do_not_see(
        ray_cluster, tmp_path, monkeypatch):
    """Before the archive is listed: on a real cluster rank 0 wrote the run's checkpoints on a
    GPU node and Ray failed it after the first epoch (`/proc/self/cwd` is a path only this
    process resolves to its own folder, see tests/test_cluster_config.py)."""
    from pipelines import cluster
    from pipelines.train import run

    monkeypatch.setattr(cluster, "_started_here", False)
    monkeypatch.chdir(tmp_path)
    cfg = config(tmp_path, "output_dir=/proc/self/cwd/outputs", "trainer=ray",
                 "trainer.num_workers=1")
    with pytest.raises(RuntimeError, match=r"^output_dir=/proc/self/cwd/outputs: .* running "
                                           r"the 1 training worker\(s\) does not see"):
        run(cfg)
    assert not (tmp_path / "outputs" / "data").exists()  # nothing generated, nothing listed


def test_a_synthetic_set_generated_under_other_settings_is_refused_not_used(tmp_path):
    """`data.generate.*` did nothing once the folder held files: later runs trained on the old
    set without a word."""
    from pipelines.data import GENERATED_STAMP, ensure_dataset

    small = config(tmp_path, "data.generate.n_per_class=2", "data.generate.size=16")
    archive = Path(ensure_dataset(small["data"]))
    assert json.loads((archive / GENERATED_STAMP).read_text())["n_per_class"] == 2
    assert ensure_dataset(small["data"]) == str(archive)  # the same settings: used
    bigger = config(tmp_path, "data.generate.n_per_class=3", "data.generate.size=16")
    with pytest.raises(ValueError, match=r"holds a synthetic set generated under other "
                                         r"data.generate settings \(n_per_class 2 -> 3\)"):
        ensure_dataset(bigger["data"])
    assert len(list((archive / "normal").glob("*_mask.png"))) == 2  # left as it was
    with pytest.raises(ValueError, match="data.generate.n_per_class must be a whole number"):
        ensure_dataset(config(tmp_path / "new", "data.generate.n_per_class=0")["data"])
