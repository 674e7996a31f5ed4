"""Training: in-process and Ray Train (2 CPU workers, DDP over gloo), fault injection, resume."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from pipelines.config import load_config

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


def test_local_training_writes_bundles_and_logs(tmp_path):
    from pipelines.train import run

    cfg = config(tmp_path, "trainer=local", "train.epochs=3", "train.classifier_epochs=1",
                 "run_name=local")
    bundles = run(cfg)
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

    cfg = config(tmp_path, "trainer=ray", "trainer.num_workers=2", "trainer.cpus_per_worker=0.5",
                 "train.epochs=5", "train.classifier_epochs=1", "run_name=ddp")
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
    assert float(rows[-1]["val_dice"]) == pytest.approx(whole["dice"], abs=1e-9)
    assert float(rows[-1]["val_iou"]) == pytest.approx(whole["iou"], abs=1e-9)

    chain = Chain.from_uris(bundles["segmenter"], bundles["classifier"])
    out = chain.predict([np.full((70, 90, 3), 128, np.uint8)])
    assert out[0]["mask"].shape == (70, 90)
    assert out[0]["label_name"] in cfg["data"]["class_names"]


@pytest.mark.ray
def test_worker_failure_is_survived_and_rerun_resumes(tmp_path, ray_cluster):
    from pipelines.train import run

    args = ["trainer=ray", "trainer.num_workers=2", "trainer.cpus_per_worker=0.5",
            "train.epochs=3", "stages=[segmenter]", "run_name=faulty",
            "trainer.max_failures=1", "trainer.fail_at_epoch.segmenter=1"]
    run(config(tmp_path, *args))
    run_dir = tmp_path / "runs" / "faulty"
    assert (run_dir / ".fail-segmenter").exists(), "the injected failure did not happen"
    rows = read_csv(run_dir / "segmenter" / "metrics.csv")
    assert [int(float(r["epoch"])) for r in rows] == [0, 1, 2]  # continuous, none repeated
    ray_dir = run_dir / "ray" / "faulty-segmenter"
    assert len(list(ray_dir.glob("checkpoint_*"))) >= 1

    # same run name, one more epoch: resumes at epoch 3 instead of starting over
    run(config(tmp_path, *args[:-2], "train.epochs=4"))
    rows = read_csv(run_dir / "segmenter" / "metrics.csv")
    assert [int(float(r["epoch"])) for r in rows] == [0, 1, 2, 3]
