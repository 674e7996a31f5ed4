"""Train the segmenter, then the lesion classifier; each stage writes model bundles.

    python pipelines/train.py                                   # embedded synthetic default
    python pipelines/train.py data=busi train.epochs=60 trainer=ray trainer.num_workers=4
    ray submit cluster.yaml pipelines/train.py data=busi trainer.use_gpu=true ...

Settings: pipelines/conf (Hydra). `trainer=local` trains in-process; `trainer=ray` runs the same
loop in Ray Train workers (DDP).
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

_ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, "") and (_ROOT / "medseg_core").is_dir():  # `python pipelines/train.py`
    sys.path.insert(0, str(_ROOT))

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from medseg_core.checkpoint import BundleError, read_bundle_meta
from medseg_core.dataset import RecordDataset, collate
from medseg_core.engine import check_scheduler, optimizer_settings
from medseg_core.inference import MODES, check_threshold
from medseg_core.layouts import Record
from medseg_core.losses import UnknownLossKeysError, build_loss
from medseg_core.models.registry import build_model
from medseg_core.precision import check_device, resolve_device
from medseg_core.transforms import build_transforms
from pipelines import CONF_DIR
from pipelines.cluster import disconnect
from pipelines.config import (
    check_flag,
    check_number,
    check_whole,
    explained_storage_errors,
    reported_refusals,
    resolve,
)
from pipelines.data import (
    _max_pixels,
    check_decode_settings,
    check_split,
    data_report,
    load_any_record,
    packed_size,
    read_settings,
    report_options,
    split_identity,
    split_mode,
    split_views,
)
from pipelines.loop import StageSpec, epoch_seed, fit_stage
from pipelines.runlog import (
    RunLock,
    RunLog,
    complete_dir,
    finished,
    finished_note,
    join,
    next_epoch,
    record_splits,
)
from pipelines.tuning import (
    chain_scores,
    choose_mask_clearing,
    choose_postprocess,
    clear_masks_mode,
    lesion_free_classes,
    postprocess_mode,
    test_dice,
)

STAGES = ("segmenter", "classifier")


def run_dir(cfg: dict[str, Any]) -> str:
    return join(cfg["output_dir"], "runs", cfg["run_name"])


def classifier_model(model: Mapping[str, Any], class_names: Sequence[str]) -> dict[str, Any]:
    """The `classifier` config with `num_classes` from the class names when null; a number
    that disagrees with them is refused."""
    model, names = dict(model), list(class_names)
    if model.get("num_classes") is None:
        model["num_classes"] = len(names)
    elif int(model["num_classes"]) != len(names):
        raise ValueError(f"classifier.num_classes={model['num_classes']} but data.class_names "
                         f"has {len(names)} ({', '.join(names)}): set "
                         f"classifier.num_classes={len(names)} (or null)")
    return model


def _archive_name(url: str) -> str:
    """`data.url` as a bundle may record it: local paths absolute, no credentials or query."""
    parts = urlsplit(str(url))
    if not parts.scheme or parts.scheme == "file":
        return os.path.abspath(os.path.expanduser(parts.path if parts.scheme else str(url)))
    return urlunsplit((parts.scheme, parts.hostname or "", parts.path.rstrip("/"), "", ""))


def training_data(cfg: dict[str, Any]) -> dict[str, Any]:
    """What a run's bundles were trained on and which images it held out: archive, layout,
    layout options, split settings and seed. A rerun of the run must match it."""
    data = cfg["data"]
    return json.loads(json.dumps({
        "url": _archive_name(data["url"]), "layout": data.get("layout"),
        "options": dict(data.get("options") or {}), "split": split_identity(data.get("split")),
        "seed": int(cfg.get("seed", 0))}, default=str))


def training_recipe(cfg: dict[str, Any], stage: str) -> dict[str, Any]:
    """How a stage's bundles were trained, by setting name (a bundle's `training`): the
    optimiser, schedule, loss, batch size, clipping, weight averaging and augmentation, and the
    classifier's masks. A rerun may change them for the epochs it has left (the next epochs
    train under them, and it says so), not for a stage it has nothing left to train."""
    train, seg = cfg["train"], stage == "segmenter"
    recipe = {
        "train.optimizer" if seg else "train.classifier_optimizer":
            train["optimizer" if seg else "classifier_optimizer"],
        "train.scheduler": train["scheduler"],
        "train.loss" if seg else "train.classifier_loss": train["loss" if seg else
                                                                 "classifier_loss"],
        "train.batch_size": train["batch_size"],
        "train.grad_clip": train.get("grad_clip"),
        "train.ema_decay": train.get("ema_decay") or 0.0,
        "data.augment": cfg["data"]["augment"],
    }
    if not seg:
        recipe["train.classifier_masks"] = train.get("classifier_masks") or {}
    return json.loads(json.dumps(recipe, default=str))


def _flat(value: Any, name: str) -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in _flat(sub, f"{name}.{key}").items()}
    return {name: value}


def recipe_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """`setting: old -> new` for each setting of two training recipes that differs."""
    before = {k: v for key, value in old.items() for k, v in _flat(value, key).items()}
    after = {k: v for key, value in new.items() for k, v in _flat(value, key).items()}
    unset = "(unset)"
    return [f"{k}: {before.get(k, unset)} -> {after.get(k, unset)}"
            for k in sorted(set(before) | set(after))
            if before.get(k, unset) != after.get(k, unset)]


# bundle settings that fix what a run trains: a rerun under the same run_name resumes it only
# where they are unchanged
RUN_IDENTITY = ("task", "dataset", "input_size", "in_channels", "mean", "std", "class_names",
                "threshold", "training_data")


def check_resumable(cfg: dict[str, Any]) -> None:
    """Refuse to go on with a run whose latest bundles were trained on other data, another
    split or another model than `cfg` asks for. Without this, a rerun of a finished run under
    new settings skipped its stages as done, then re-chose the segmenter's post-processing on
    the new validation split and reported the old model's test Dice on the new data.

    A stage this run does not train is checked for its training data (archive and split) only:
    `stages=[classifier]` under another split would train and choose the mask clearing on
    images the run's segmenter trained on."""
    for stage in STAGES:
        # read where it lies: this runs before the run's lock is taken, and putting a bundle
        # back (`resume_dir`) under a run that holds it broke that run's rename of `latest/`
        latest = complete_dir(RunLog(run_dir(cfg), stage).latest)
        if latest is None:
            continue
        _, old = read_bundle_meta(latest)
        if isinstance(old.get("training_data"), dict):
            # as `training_data` names them now: bundles before kept a URL's trailing slash
            # and the other split mode's keys
            before = old["training_data"]
            if before.get("url"):
                before["url"] = _archive_name(before["url"])
            if isinstance(before.get("split"), dict):
                before["split"] = split_identity(before["split"])
        trained = stage in cfg["stages"]
        if trained:
            spec = stage_spec(cfg, stage)
            new = json.loads(json.dumps({"model": spec.model, **spec.bundle_config}, default=str))
        else:
            new = {"model": {}, "training_data": training_data(cfg)}
        changed = []
        for k in RUN_IDENTITY if trained else ("training_data",):
            if k not in old or old[k] == new.get(k):
                continue
            if isinstance(old[k], dict) and isinstance(new.get(k), dict):
                changed += [f"{k}.{sub}" for sub in sorted(set(old[k]) | set(new[k]))
                            if old[k].get(sub) != new[k].get(sub)]
            else:
                changed.append(k)
        old_model, new_model = old.get("model") or {}, new["model"]
        changed += [f"{'model' if stage == 'segmenter' else 'classifier'}.{k}"
                    for k in sorted(set(old_model) & set(new_model))
                    if old_model[k] != new_model[k]]
        if changed:
            raise ValueError(
                f"run {cfg['run_name']!r} already holds a {stage} trained with other settings "
                f"({', '.join(changed)} differ from {latest}): resuming it would mix them. Use "
                "another run_name for the new settings, or the run's own settings to go on (a "
                "Hydra multirun over such a setting needs a run_name per job, e.g. "
                "'run_name=seed${seed}')")
        differ = recipe_changes(old.get("training") or {}, new.get("training") or {}) if (
            trained and isinstance(old.get("training"), dict)) else []
        if not differ:
            continue
        state = RunLog(run_dir(cfg), stage).train_state(read_only=True)
        if _finished(cfg, stage, state):
            raise ValueError(
                f"run {cfg['run_name']!r} has finished its {stage} under other training "
                f"settings ({'; '.join(differ)}): this rerun would train nothing and report "
                "that training's figures. Use another run_name for the new settings (a Hydra "
                "multirun over them needs a run_name per job, e.g. "
                "'run_name=lr${train.optimizer.lr}'), or a larger epoch count to go on training "
                "this run under them")
        print(f"[{stage}] resuming at epoch {next_epoch(state)} under other training settings "
              f"than its epochs so far: {'; '.join(differ)}", flush=True)


def stage_spec(cfg: dict[str, Any], stage: str) -> StageSpec:
    """Plain settings of one stage from the composed config."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    data, train, trainer = cfg["data"], cfg["train"], cfg["trainer"]
    seg = stage == "segmenter"
    bundle_config = {
        "task": "segmentation" if seg else "classification",
        "input_size": list(data["image_size"]),
        "in_channels": int(data["channels"]),
        "mean": list(data["mean"]),
        "std": list(data["std"]),
        "threshold": float(train["threshold"]),
        "class_names": list(data["class_names"]),
        "inference": dict(data.get("inference") or {"mode": "resize", "tile_overlap": 32}),
        "dataset": data["name"],
        "training_data": training_data(cfg),
        "training": training_recipe(cfg, stage),
    }
    gpu_aug = bool(trainer.get("gpu_augment", False))
    fail = trainer.get("fail_at_epoch", {}) or {}
    masks = dict(train.get("classifier_masks") or {})
    predicted = float(masks.get("predicted", 0.0))
    validate = str(masks.get("validate", "truth"))
    if not 0.0 <= predicted <= 1.0:
        raise ValueError(f"train.classifier_masks.predicted must be in [0, 1], got {predicted}")
    if validate not in ("truth", "predicted"):
        raise ValueError("train.classifier_masks.validate must be truth or predicted, "
                         f"got {validate!r}")
    model = dict(cfg["model"] if seg else cfg["classifier"])
    group = "model" if seg else "classifier"
    channels = int(data["channels"])
    if int(model.get("in_channels", channels)) != channels:
        raise ValueError(f"{group}.in_channels={model['in_channels']} but data.channels="
                         f"{channels}: set one to the other")
    if not seg:
        if not data["class_names"]:
            raise ValueError(f"the classifier stage needs labelled data, and data={data['name']} "
                             "has no data.class_names: train stages=[segmenter]")
        model = classifier_model(model, data["class_names"])
    return StageSpec(
        stage=stage,
        model=model,
        epochs=int(train["epochs"] if seg else train["classifier_epochs"]),
        optimizer=dict(train["optimizer"] if seg else train["classifier_optimizer"]),
        scheduler=dict(train["scheduler"]),
        loss=dict(train["loss"] if seg else train["classifier_loss"]),
        bundle_config=bundle_config,
        grad_clip=train.get("grad_clip"),
        threshold=float(train["threshold"]),
        seed=int(cfg["seed"]),
        early_stopping_patience=int(train.get("early_stopping_patience", 0)),
        ema_decay=float(train.get("ema_decay") or 0.0),
        gpu_augment=dict(data["augment"]) if gpu_aug else None,
        bf16=bool(trainer.get("bf16", True)),
        cpu_bf16=bool(trainer.get("cpu_bf16", False)),
        channels_last=bool(trainer.get("channels_last", False)),
        fail_at_epoch=int(fail.get(stage, -1)),
        fail_marker=join(run_dir(cfg), f".fail-{stage}") if fail.get(stage, -1) >= 0 else None,
        predicted_masks=predicted,
        validate_masks=validate,
        mask_segmenter=masks.get("segmenter") or join(run_dir(cfg), "segmenter", "best"),
    )


def cpu_transforms(cfg: dict[str, Any], train: bool):
    """Per-sample transforms on CPU workers: resize, plus augmentation unless it runs on the GPU."""
    data = cfg["data"]
    aug = {} if (not train or cfg["trainer"].get("gpu_augment")) else dict(data["augment"])
    return build_transforms({"size": list(data["image_size"]), **aug}, train=train and bool(aug))


class LocalContext:
    """In-process runtime: a torch DataLoader feeds one worker; bundles go to the run log."""

    rank, world_size = 0, 1

    def __init__(self, cfg: dict[str, Any], splits: dict[str, list[Record]], log: RunLog):
        self.device = resolve_device(cfg["trainer"].get("device", "auto"), "trainer.device")
        self.epoch_offset = int(cfg["data"].get("epoch_offset", 0))
        bs, ebs = int(cfg["train"]["batch_size"]), int(cfg["train"]["eval_batch_size"])
        workers = int(cfg["trainer"].get("loader_workers", 0))
        # raw or packed archives, read as the Ray pipeline reads them
        loader = functools.partial(load_any_record, cfg=cfg, keep_grey=True)
        channels = int(cfg["data"].get("channels", 3))
        self.train_set = RecordDataset(splits["train"], cpu_transforms(cfg, True),
                                       seed=int(cfg["seed"]), loader=loader, channels=channels)
        val = RecordDataset(splits["val"], cpu_transforms(cfg, False), loader=loader,
                            channels=channels)
        self.seed, self.shuffle = int(cfg["seed"]), torch.Generator()
        self.train_loader = torch.utils.data.DataLoader(
            self.train_set, batch_size=bs, shuffle=bool(cfg["data"].get("shuffle", True)),
            drop_last=len(self.train_set) > bs,
            collate_fn=collate, num_workers=workers, generator=self.shuffle)
        self.val_loader = torch.utils.data.DataLoader(val, batch_size=ebs, collate_fn=collate,
                                                      num_workers=workers)
        self.log = log

    def train_batches(self, epoch: int):
        epoch += self.epoch_offset  # data.epoch_offset: the augmentation epoch of the first pass
        self.train_set.set_epoch(epoch)
        # each epoch's order from its number, so a resumed run does not replay epoch 0's
        self.shuffle.manual_seed(epoch_seed(self.seed, 0, epoch))
        return self.train_loader

    def val_batches(self):
        return self.val_loader

    def steps_per_epoch(self) -> int:
        return len(self.train_loader)

    def wrap_model(self, model):
        return model

    def all_sum(self, values: np.ndarray) -> np.ndarray:
        return values

    def sync_buffers(self, module: torch.nn.Module) -> None:
        """One worker: its buffers are the saved model's."""

    def resume_dir(self) -> str | None:
        return self.log.resume_dir()

    def report(self, metrics, bundle_dir, history) -> None:
        self.log.record(metrics, bundle_dir, history)
        print(format_epoch(metrics), flush=True)


def format_epoch(m: dict[str, float]) -> str:
    keys = [k for k in ("train_loss", "val_loss", "val_dice", "val_iou", "val_accuracy",
                        "val_macro_f1", "samples_per_s") if k in m]
    body = "  ".join(f"{k}={m[k]:.4f}" for k in keys)
    return f"epoch {int(m['epoch']):3d}  {body}{'  *best' if m.get('is_best') else ''}"


def run_local(cfg: dict[str, Any], splits: dict[str, list[Record]], stage: str) -> str:
    """Train one stage in-process; returns its best bundle."""
    log = RunLog(run_dir(cfg), stage)
    ctx = LocalContext(cfg, splits, log)
    print(f"[{stage}] training in-process on {ctx.device}: {len(splits['train'])} train, "
          f"{len(splits['val'])} val images", flush=True)
    fit_stage(stage_spec(cfg, stage), ctx)
    log.close()
    return log.best


def chain_segmenter(cfg: dict[str, Any], bundles: Mapping[str, str]) -> str | None:
    """The segmenter the classifier's chain runs with: this run's, or the one its classifier
    masks came from (`train.classifier_masks.segmenter`, else the run's best), if it exists."""
    if "segmenter" in bundles:
        return bundles["segmenter"]
    uri = stage_spec(cfg, "classifier").mask_segmenter
    try:
        read_bundle_meta(uri)
    except BundleError:
        return None
    return uri


def summarize(cfg: dict[str, Any], bundles: dict[str, str],
              splits: dict[str, list[Record]]) -> list[str]:
    """The run's closing lines: where the bundles are and the segmenter's Dice on the
    held-out split (scored here, so a bad file found doing so is in the data report); where
    the classifier clears the masks of images it calls lesion-free, the chain's Dice too."""
    lines = ["", "bundles:", *(f"  {stage:10s} {uri}" for stage, uri in bundles.items())]
    held_out = splits.get("test") or splits["val"]
    if "segmenter" not in bundles:
        return lines
    name = "test" if splits.get("test") else "val"
    free = ()
    if "classifier" in bundles:
        _, cls_config = read_bundle_meta(bundles["classifier"])
        free = tuple(cls_config.get("lesion_free_classes") or ())
    if free:
        scores = chain_scores(bundles["segmenter"], bundles["classifier"], held_out, cfg, free)
        agg, chain = scores["kept"], scores["cleared"]
    else:
        agg, chain = test_dice(bundles["segmenter"], held_out, cfg), None
    resized = packed_size(cfg["data"])
    at = (f", at the pack's {resized[0]}x{resized[1]}, not the images' original size"
          if resized else "")
    lines += ["", f"{name} split ({len(held_out)} images{at}): Dice {agg['dice']:.4f}  "
                  f"IoU {agg['iou']:.4f}"]
    if chain is not None:
        lines.append(f"  through the chain (masks of images classified {'/'.join(free)} "
                     f"cleared): Dice {chain['dice']:.4f}  IoU {chain['iou']:.4f}")
    return lines


def check_trainer(trainer: dict[str, Any]) -> None:
    """The worker group's settings (Ray's own errors about them come only after the archive
    is listed and read, and a worker group of 0 fails with a division by zero)."""
    backend = trainer.get("backend", "local")
    if backend not in ("local", "ray"):
        raise ValueError(f"unknown trainer.backend {backend!r}; expected local or ray")
    for key in ("bf16", "cpu_bf16", "channels_last"):
        check_flag(trainer.get(key, False), f"trainer.{key}")
    for stage, epoch in (trainer.get("fail_at_epoch") or {}).items():
        if stage not in STAGES:  # a misspelt stage injected no failure, silently
            raise ValueError(f"trainer.fail_at_epoch.{stage}: no such stage; stages are "
                             f"{list(STAGES)}")
        check_whole(epoch, f"trainer.fail_at_epoch.{stage}", -1)
    if backend == "local":  # trains in this process, on its GPUs
        resolve_device(trainer.get("device", "auto"), "trainer.device")
        check_whole(trainer.get("loader_workers", 0), "trainer.loader_workers", 0)
        return
    check_device(trainer.get("device", "auto"), "trainer.device")
    check_whole(trainer.get("num_workers"), "trainer.num_workers", 1)
    check_whole(trainer.get("local_num_cpus"), "trainer.local_num_cpus", 1, none=True)
    check_whole(trainer.get("max_failures", 3), "trainer.max_failures", -1)  # -1: no limit
    check_whole(trainer.get("num_to_keep", 2), "trainer.num_to_keep", 1, none=True)
    check_number(trainer.get("cpus_per_worker", 1), "trainer.cpus_per_worker", 0)
    if trainer.get("use_gpu"):
        check_number(trainer.get("gpus_per_worker", 1), "trainer.gpus_per_worker", 0, strict=True)
    elif not trainer.get("cpus_per_worker", 1):
        raise ValueError("trainer.cpus_per_worker=0 without GPUs leaves a worker no resources "
                         "to be scheduled by: give it CPUs, or set trainer.use_gpu=true")


def check_input_settings(data: dict[str, Any]) -> None:
    """`data.image_size`, `channels`, `mean` and `std`, which make the model's input (a std of
    0 trained a NaN model to the end; a bad mean or channel count failed after listing, naming
    no setting)."""
    check_decode_settings(data)
    size = data.get("image_size")
    if not isinstance(size, list) or len(size) != 2 or any(
            isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in size):
        raise ValueError(f"data.image_size must be [height, width] of whole numbers >= 1, "
                         f"got {size!r}")
    limit = _max_pixels(data)
    if limit is not None and size[0] * size[1] > limit:
        raise ValueError(f"data.image_size={size} is {size[0] * size[1]} pixels, over "
                         f"data.max_pixels={limit}")
    channels = data.get("channels")
    for key in ("mean", "std"):
        values = data.get(key)
        if not isinstance(values, list) or len(values) not in (1, channels) or any(
                isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                for v in values):
            raise ValueError(f"data.{key} must be a list of 1 or data.channels={channels} "
                             f"numbers, got {values!r}")
    if not all(v > 0 for v in data["std"]):
        raise ValueError(f"data.std must be > 0 (images are divided by it), got {data['std']!r}")
    check_inference(data.get("inference"))


def check_inference(inference: Any) -> None:
    """`data.inference`, the bundle's inference mode (a bad one made a bundle that every
    predictor refused to load, after training)."""
    if inference is None:
        return
    if not isinstance(inference, dict) or set(inference) - {"mode", "tile_overlap",
                                                            "channels_last"}:
        raise ValueError("data.inference takes mode (resize or tile), tile_overlap (pixels, or "
                         "a fraction of the tile below 1) and channels_last (true or false), "
                         f"got {inference!r}")
    check_flag(inference.get("channels_last", False), "data.inference.channels_last")
    if inference.get("mode", "resize") not in MODES:
        raise ValueError(f"data.inference.mode must be one of {list(MODES)}, got "
                         f"{inference.get('mode')!r}")
    overlap = inference.get("tile_overlap", 32)
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not (
            math.isfinite(overlap) and overlap >= 0):
        raise ValueError(f"data.inference.tile_overlap must be a number >= 0, got {overlap!r}")


def check_model(model: dict[str, Any], setting: str) -> None:
    """The model a stage builds, built here without memory (torch's meta device): a bad name,
    argument or value (a dropout of 5) failed after listing, or the classifier's only once
    the whole segmenter stage had trained."""
    try:
        with torch.device("meta"):
            build_model(model)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{setting}: {exc}") from None
    if setting == "model" and model.get("out_channels", 1) != 1:
        raise ValueError(f"model.out_channels must be 1 (the lesion's logit), got "
                         f"{model.get('out_channels')!r}")


def check_settings(cfg: dict[str, Any]) -> None:
    """Refuse bad choices before any data is read or epoch trained (they were found only
    after training, or not at all)."""
    check_trainer(cfg["trainer"])
    check_input_settings(cfg["data"])
    report_options(cfg)  # credential keys refused
    threshold = cfg["train"].get("threshold")
    try:  # the bundle's threshold: no null here, unlike the jobs' override
        if check_threshold(threshold) is None:
            raise ValueError
    except ValueError:
        raise ValueError(f"train.threshold must be strictly between 0 and 1, got "
                         f"{threshold!r}") from None
    check_whole(cfg.get("seed", 0), "seed", 0)
    train = cfg["train"]
    for key in ("epochs", "classifier_epochs", "batch_size", "eval_batch_size"):
        check_whole(train.get(key), f"train.{key}", 1)
    check_whole(train.get("early_stopping_patience", 0), "train.early_stopping_patience", 0)
    read_settings(cfg["data"])
    stages = cfg.get("stages")
    if not isinstance(stages, list) or not stages or any(s not in STAGES for s in stages):
        raise ValueError(f"stages must be a non-empty list of {list(STAGES)}, e.g. "
                         f"stages=[segmenter]; got {stages!r}")
    postprocess_mode(cfg)
    clear_masks_mode(cfg)
    lesion_free_classes(cfg)
    split = cfg["data"].get("split") or {}
    check_split(split)
    if split_mode(split) == "ratio" and not float(list(split.get("ratios", (0.8, 0.1, 0.1)))[1]) > 0:
        raise ValueError("data.split.ratios gives the validation split no share: the best "
                         f"epoch and early stopping are chosen on it; got {split.get('ratios')}")
    check_scheduler(cfg["train"]["scheduler"])
    # bad augmentation ranges raise here rather than in the read tasks
    try:
        build_transforms({"size": list(cfg["data"]["image_size"]),
                          **dict(cfg["data"]["augment"])}, train=True)
    except ValueError as exc:
        raise ValueError(f"data.augment: {exc}") from exc
    for stage in stages:
        spec = stage_spec(cfg, stage)
        seg = stage == "segmenter"
        check_model(spec.model, "model" if seg else "classifier")
        optimizer_settings(spec.optimizer, "train.optimizer" if seg else "train.classifier_optimizer")
        setting = f"train.{'loss' if seg else 'classifier_loss'}"
        try:
            build_loss(spec.loss)
        except UnknownLossKeysError as exc:
            # the config's defaults are dice_bce's: another loss name needs them removed
            remove = " ".join(f"~{setting}.{key}" for key in exc.keys)
            raise ValueError(f"{setting}: {exc} (remove them with `{remove}`)") from None
        except ValueError as exc:
            raise ValueError(f"{setting}: {exc}") from None
        if spec.grad_clip is not None and not float(spec.grad_clip) > 0:
            # clip_grad_norm_ with a negative norm flips every gradient
            raise ValueError(f"train.grad_clip must be > 0 or null (off), got {spec.grad_clip}")
        if not 0.0 <= spec.ema_decay < 1.0:
            raise ValueError("train.ema_decay must be in [0, 1) (0 = off; e.g. 0.995 averages "
                             f"about the last 200 steps), got {spec.ema_decay}")


def run(cfg: dict[str, Any], release: Callable[[], None] | None = None) -> dict[str, str]:
    """Train the configured stages; returns their best bundles. `release` runs before the
    closing lines are printed, once nothing needs Ray any more (the entry point leaves Ray
    there, so that the worker log lines Ray holds back come before those lines)."""
    check_settings(cfg)
    check_resumable(cfg)
    backend = cfg["trainer"].get("backend", "local")
    if backend == "ray":
        from pipelines.train_ray import join_cluster

        join_cluster(cfg, float(read_settings(cfg["data"])["num_cpus"]))
    # the in-process trainer's DataLoader cannot drop a bad record: check them all first
    splits, listed = split_views(cfg, check=backend == "local")
    print("split sizes: " + ", ".join(f"{k}={len(v)}" for k, v in splits.items()), flush=True)
    if not splits["val"]:
        raise ValueError(f"the validation split is empty ({len(splits['train'])} train records): "
                         "the best epoch and early stopping are chosen on it; use more data or "
                         "a larger data.split.ratios[1]")
    if "classifier" in cfg["stages"]:
        for part in ("train", "val"):
            if not any(r.label >= 0 for r in splits[part]):
                raise ValueError(f"the classifier stage needs labelled records, and none of the "
                                 f"{len(splits[part])} {part} records has a label (a layout "
                                 "labels them from its folders or a labels CSV, e.g. "
                                 "+data.options.labels_csv=<csv>): train stages=[segmenter]")
    lock = RunLock(run_dir(cfg))
    lock.acquire(str(cfg["run_name"]))
    try:
        return _run_locked(cfg, splits, listed, backend, release)
    finally:
        lock.release()


def _finished(cfg: dict[str, Any], stage: str, train_state: dict[str, Any]) -> bool:
    spec = stage_spec(cfg, stage)
    return finished(train_state, spec.epochs, spec.early_stopping_patience)


def _run_locked(cfg: dict[str, Any], splits: dict[str, list[Record]],
                listed: dict[str, list[Record]], backend: str,
                release: Callable[[], None] | None) -> dict[str, str]:
    """`run` once it holds the run's lock."""
    states = {s: RunLog(run_dir(cfg), s).train_state() for s in STAGES}
    for stage in (s for s in STAGES if s in cfg["stages"]):
        added = RunLog(run_dir(cfg), stage).catch_up(states[stage])
        if added:
            print(f"[{stage}] logs caught up with the latest bundle: {added} epoch(s) added to "
                  "metrics.csv, TensorBoard and the curves", flush=True)
    # recorded once the run is sure to start: a refused run leaves no run directory. Until a
    # stage has a bundle, a start that died early holds nothing of its split: record anew
    moved = record_splits(run_dir(cfg), {k: [r.id for r in v] for k, v in splits.items()},
                          replace=not any(states.values()))
    if moved and listed != splits:
        # a start under trainer=ray recorded the splits as listed, where a split holds a bad
        # record that its readers drop (dedup off); the in-process trainer's leave it out. (The
        # other way round the check would decode the archive on the driver: not done.)
        if not record_splits(run_dir(cfg), {k: [r.id for r in v] for k, v in listed.items()}):
            moved = []
    if moved:
        warnings.warn(f"run {cfg['run_name']!r}: the {', '.join(moved)} split(s) now hold other "
                      "records than when the run started (the archive changed): its validation "
                      "and test figures are no longer of the images it held out", stacklevel=2)
    # a finished stage keeps the inference choices made on its own validation split (a named
    # setting, chosen on no split, is applied as always)
    chosen = {"segmenter": postprocess_mode(cfg) == "auto",
              "classifier": clear_masks_mode(cfg) == "auto"}
    keep_choices = {s for s in cfg["stages"]
                    if moved and chosen[s] and _finished(cfg, s, states[s])}
    if backend == "local":
        train_stage = run_local
    else:  # "ray" (check_settings refused any other)
        from pipelines.train_ray import run_ray as train_stage
    bundles = {}
    # the segmenter first, whatever the order asked: the classifier's masks and its mask
    # clearing are chosen with it (`stages=[classifier,segmenter]` skipped that choice)
    for stage in (s for s in STAGES if s in cfg["stages"]):
        spec = stage_spec(cfg, stage)
        note = finished_note(stage, states[stage], spec.epochs, spec.early_stopping_patience)
        if note:  # before a worker group and its datasets start for nothing
            print(note, flush=True)
            bundles[stage] = RunLog(run_dir(cfg), stage).best
        else:
            bundles[stage] = train_stage(cfg, splits, stage)
        if stage in keep_choices:
            print(f"[{stage}] finished before the splits changed: its inference choices stay",
                  flush=True)
        elif stage == "segmenter":
            # before the classifier stage: the masks it trains on are made with the options
            # the chain will use
            choose_postprocess(bundles[stage], splits["val"], cfg)
        else:  # the masks the chain gives images it classifies lesion-free
            choose_mask_clearing(bundles[stage], chain_segmenter(cfg, bundles), splits["val"],
                                 cfg)
    closing = summarize(cfg, bundles, splits)
    data_report(cfg)  # the complete bad-input report on disk, and a warning naming the files
    if release is not None:
        release()
    print("\n".join(closing), flush=True)
    return bundles


@hydra.main(config_path=CONF_DIR, config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    with reported_refusals(), explained_storage_errors():
        run(resolve(cfg), release=disconnect)


if __name__ == "__main__":
    main()
