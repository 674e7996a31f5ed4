"""Inference options chosen on the validation split once training is over (as nnU-Net chooses
its post-processing), written into the bundles the chain loads:

- the segmenter's post-processing (`train.postprocess`: flip TTA, largest component);
- the chain's mask clearing (`train.clear_masks`): an image the classifier assigns to one of
  `data.lesion_free_classes` (BUSI's normal: no lesion by definition) gets an empty mask
  instead of whatever blobs the segmenter found.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from medseg_core.checkpoint import Bundle, load_bundle, save_bundle
from medseg_core.inference import Classifier, Segmenter, summarize_prediction
from medseg_core.layouts import Record
from medseg_core.metrics import SegmentationMeter
from pipelines.data import BAD_INPUT_ERRORS, Problem, load_any_record, record_problems
from pipelines.runlog import copy_dir

# inference options chosen after training: name -> (flip, keep_largest), cheapest first
POSTPROCESS = {"none": (False, False), "largest": (False, True), "flip": (True, False),
               "flip+largest": (True, True)}
CLEAR_MODES = ("auto", True, False)


Predict = Callable[[Record, dict[str, Any]], Mapping[str, np.ndarray]]


def _score_records(records: list[Record], cfg: dict[str, Any],
                   predict: Predict) -> dict[str, dict[str, float]]:
    """Dice/IoU/... per name of the masks `predict(record, sample)` gives, against each
    record's mask, at its original resolution (records raw or packed, each decoded once). A
    bad record is reported in the run's data report (or stops a strict run)."""
    meters: dict[str, SegmentationMeter] = {}
    strict = bool(cfg["data"].get("strict", False))
    problems = []
    for rec in records:
        try:
            sample = load_any_record(rec, cfg, keep_grey=True)
        except BAD_INPUT_ERRORS as e:  # unchecked archive (dedup off), or changed since listing
            if strict:
                raise
            problems.append(Problem.of("decode", e, rec))
            continue
        for name, mask in predict(rec, sample).items():
            meters.setdefault(name, SegmentationMeter()).update(mask[None], sample["mask"][None])
    record_problems(cfg, problems)
    return {name: meter.aggregate() for name, meter in meters.items()}


def segmentation_scores(seg_uri: str, records: list[Record], cfg: dict[str, Any],
                        options: Mapping[str, Mapping[str, Any]],
                        device: str = "cpu") -> dict[str, dict[str, float]]:
    """Dice/IoU/... of a segmenter bundle on records, for each named set of `Segmenter`
    overrides (`{}`: the bundle's own options). One pass: the bundle is loaded and each
    record decoded once for all the options."""
    bundle = load_bundle(seg_uri)
    segmenters = {name: Segmenter(bundle, device=device, **over) for name, over in options.items()}
    return _score_records(records, cfg, lambda _, sample: {
        name: segmenter.predict([sample["image"]])[0] for name, segmenter in segmenters.items()})


def test_dice(seg_uri: str, records: list[Record], cfg: dict[str, Any], device: str = "cpu",
              keep_largest: bool | None = None, flip: bool | None = None) -> dict[str, float]:
    """`segmentation_scores` of one option (`keep_largest`, `flip`: override the bundle's)."""
    over = {"keep_largest": keep_largest, "flip": flip}
    return segmentation_scores(seg_uri, records, cfg, {"one": over}, device)["one"]


def _chain_masks(seg_uri: str, cls_uri: str, lesion_free: tuple[str, ...],
                 device: str = "cpu") -> Predict:
    """For `_score_records`: the chain's masks, the segmenter's kept (`kept`) and those of
    images classified as one of `lesion_free` cleared (`cleared`)."""
    segmenter = Segmenter(load_bundle(seg_uri), device=device)
    classifier = Classifier(load_bundle(cls_uri), device=device)

    def predict(_: Record, sample: dict[str, Any]) -> dict[str, np.ndarray]:
        image = sample["image"]
        mask = segmenter.predict([image])[0]
        probs = classifier.predict([image], [mask])[0]
        names = classifier.names_for(len(probs))
        return {"kept": mask,
                "cleared": summarize_prediction(mask, probs, names, lesion_free)["mask"]}

    return predict


def chain_scores(seg_uri: str, cls_uri: str, records: list[Record], cfg: dict[str, Any],
                 lesion_free: tuple[str, ...], device: str = "cpu") -> dict[str, dict[str, float]]:
    """Dice/IoU/... of the chain's masks with the segmenter's masks kept (`kept`) and with
    those of images classified as one of `lesion_free` cleared (`cleared`), in one pass."""
    return _score_records(records, cfg, _chain_masks(seg_uri, cls_uri, lesion_free, device))


def rewrite_bundle(uri: str, bundle: Bundle, config: dict[str, Any], metrics: dict[str, Any],
                   version: str) -> None:
    """Replace the bundle at `uri` by the same weights under another config. Staged locally,
    then swapped in as RunLog swaps bundles: a kill at any moment leaves a complete bundle
    (or one beside it that `recover_dir` finds), never a half-written one."""
    with tempfile.TemporaryDirectory(prefix="medseg-choice-") as tmp:
        save_bundle(tmp, bundle.model, config, metrics, version=version)
        copy_dir(tmp, uri)


def postprocess_mode(cfg: dict[str, Any]) -> str:
    """`train.postprocess`, checked: auto or one of `POSTPROCESS`."""
    mode = str(cfg["train"].get("postprocess", "auto"))
    if mode != "auto" and mode not in POSTPROCESS:
        raise ValueError(f"train.postprocess must be auto or one of {list(POSTPROCESS)}, "
                         f"got {mode!r}")
    return mode


def choose_postprocess(seg_uri: str, records: list[Record], cfg: dict[str, Any]) -> str:
    """Set the segmenter bundle's `inference.flip` / `inference.keep_largest` from
    `train.postprocess`, and return the option's name.

    `auto` (as nnU-Net decides its post-processing): score every option of `POSTPROCESS` on
    `records` (the validation split) and keep the best, a costlier option only when it scores
    strictly higher. A name sets it outright. The bundle is rewritten only when the setting
    changes; its version is then the weights' version plus "+flip", "+largest" or
    "+flip+largest", and its metrics keep the scores.
    """
    mode = postprocess_mode(cfg)
    scores: dict[str, float] = {}
    if mode == "auto":
        if not records:
            return "none"
        options = {name: {"flip": flip, "keep_largest": keep}
                   for name, (flip, keep) in POSTPROCESS.items()}
        scores = {name: float(agg["dice"]) for name, agg
                  in segmentation_scores(seg_uri, records, cfg, options).items()}
        choice = "none"
        for name, score in scores.items():
            if score > scores[choice]:
                choice = name
        print("[postprocess] validation Dice " + ", ".join(
            f"{name} {score:.4f}" for name, score in scores.items()) + f": {choice}", flush=True)
    else:
        choice = mode
    flip, keep = POSTPROCESS[choice]
    bundle = load_bundle(seg_uri)
    inference = dict(bundle.config.get("inference") or {})
    if (bool(inference.get("flip", False)), bool(inference.get("keep_largest", False))) \
            != (flip, keep):
        inference.update(flip=flip, keep_largest=keep)
        metrics = {**bundle.metrics, "postprocess": {"mode": mode, "choice": choice,
                                                     "val_dice": scores}}
        base = bundle.version.split("+", 1)[0]
        rewrite_bundle(seg_uri, bundle, {**bundle.config, "inference": inference}, metrics,
                       base if choice == "none" else f"{base}+{choice}")
    return choice


def clear_masks_mode(cfg: dict[str, Any]) -> str | bool:
    """`train.clear_masks`, checked: auto, true or false."""
    mode = cfg["train"].get("clear_masks", "auto")
    if mode not in CLEAR_MODES or isinstance(mode, int) and not isinstance(mode, bool):
        raise ValueError(f"train.clear_masks must be auto, true or false, got {mode!r}")
    return mode


def lesion_free_classes(cfg: dict[str, Any]) -> tuple[str, ...]:
    """`data.lesion_free_classes`, checked against `data.class_names` (none without them:
    nothing is classified)."""
    names = list(cfg["data"].get("class_names") or [])
    free = cfg["data"].get("lesion_free_classes") or []
    if not names:
        return ()
    if not isinstance(free, list) or any(n not in names for n in free):
        raise ValueError(f"data.lesion_free_classes must list some of data.class_names "
                         f"({names}), got {free!r}; data.lesion_free_classes=[] where no class "
                         "is free of lesions")
    return tuple(free)


def choose_mask_clearing(cls_uri: str, seg_uri: str | None, records: list[Record],
                         cfg: dict[str, Any]) -> tuple[str, ...]:
    """Set the classifier bundle's `lesion_free_classes` (the classes whose images the chain
    gives an empty mask) from `train.clear_masks` and `data.lesion_free_classes`; returns them.

    `auto`: the chain with `seg_uri` is scored on `records` (the validation split) with the
    masks kept and cleared, and clearing is kept only where it scores strictly higher; it is
    not where a validation image of one of those classes has a lesion (the setting then does
    not describe the data: warned). `true` sets them, `false` none. The bundle is rewritten
    only when the classes change (version "+clear"; its metrics keep the scores).
    """
    mode, free = clear_masks_mode(cfg), lesion_free_classes(cfg)
    scores: dict[str, float] = {}
    chosen: tuple[str, ...] = free if mode is True else ()
    if mode == "auto" and free and records and seg_uri is not None:
        names = list(cfg["data"]["class_names"])
        chain_masks, with_lesion = _chain_masks(seg_uri, cls_uri, free), []

        def predict(rec: Record, sample: dict[str, Any]) -> Mapping[str, np.ndarray]:
            if 0 <= rec.label < len(names) and names[rec.label] in free and sample["mask"].any():
                with_lesion.append(rec.id)
            return chain_masks(rec, sample)

        scores = {k: float(v["dice"]) for k, v in _score_records(records, cfg, predict).items()}
        if with_lesion:
            warnings.warn(f"data.lesion_free_classes={list(free)}, but {len(with_lesion)} "
                          f"validation image(s) of them have a lesion (e.g. {with_lesion[0]}): "
                          "their masks are not cleared", stacklevel=2)
            scores = {}
        else:
            chosen = free if scores["cleared"] > scores["kept"] else ()
            print(f"[clear masks] validation Dice through the chain: masks kept "
                  f"{scores['kept']:.4f}, those of images classified {'/'.join(free)} cleared "
                  f"{scores['cleared']:.4f}: {'cleared' if chosen else 'kept'}", flush=True)
    bundle = load_bundle(cls_uri)
    if tuple(bundle.config.get("lesion_free_classes") or ()) != chosen:
        metrics = {**bundle.metrics, "clear_masks": {"mode": mode, "classes": list(chosen),
                                                     "segmenter": seg_uri, "val_dice": scores}}
        base = bundle.version.split("+", 1)[0]
        rewrite_bundle(cls_uri, bundle, {**bundle.config, "lesion_free_classes": list(chosen)},
                       metrics, f"{base}+clear" if chosen else base)
    return chosen

