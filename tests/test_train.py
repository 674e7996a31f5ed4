"""Training: in-process and Ray Train (2 CPU workers, DDP over gloo), fault injection, resume."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

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
    assert float(rows[-1]["val_dice"]) == pytest.approx(whole["dice"], abs=1e-9)
    assert float(rows[-1]["val_iou"]) == pytest.approx(whole["iou"], abs=1e-9)

    cls_rows = read_csv(tmp_path / "runs" / "ddp" / "classifier" / "metrics.csv")
    assert float(cls_rows[-1]["val_images"]) == len(splits["val"])

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
    from medseg_core.engine import StepConfig, train_epoch, validate_classifier

    batches = [{"image": torch.randint(0, 255, (16, 8, 8, 3), dtype=torch.uint8),
                "mask": torch.zeros(16, 8, 8, dtype=torch.uint8),
                "label": torch.randint(0, 3, (16,))} for _ in range(4)]
    model = _SpyClassifier()
    step = StepConfig(mask_model=mask_model, mask_prob=prob)
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
