"""Largest-component post-processing: the labelling, the Segmenter option and the choice made
after training on the validation split."""

from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg_core.checkpoint import load_bundle, make_bundle_config, save_bundle
from medseg_core.inference import Segmenter
from medseg_core.layouts import list_records
from medseg_core.models import build_model
from medseg_core.postprocess import component_labels, keep_largest
from pipelines import train as train_pipeline
from pipelines.config import load_config
from pipelines.train import POSTPROCESS, choose_postprocess

SEG_MODEL = {"name": "unet", "in_channels": 3, "widths": [4, 8]}


def bfs_components(mask: np.ndarray) -> np.ndarray:
    """Reference 8-connected labelling (1..n, 0 = background) by breadth-first search."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=int)
    n = 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        n += 1
        labels[y0, x0] = n
        queue = deque([(y0, x0)])
        while queue:
            y, x = queue.popleft()
            for yy in range(max(y - 1, 0), min(y + 2, h)):
                for xx in range(max(x - 1, 0), min(x + 2, w)):
                    if mask[yy, xx] and not labels[yy, xx]:
                        labels[yy, xx] = n
                        queue.append((yy, xx))
    return labels


@pytest.mark.parametrize("seed", range(6))
def test_components_match_breadth_first_search(seed):
    rng = np.random.default_rng(seed)
    masks = rng.random((3, 21, 26)) > rng.uniform(0.35, 0.75)
    got = component_labels(torch.from_numpy(masks)).numpy()
    for mask, labels in zip(masks, got):
        ref = bfs_components(mask)
        assert ((labels > 0) == mask).all()
        pairs = set(zip(ref[mask].tolist(), labels[mask].tolist()))
        # the same partition: a one-to-one map between reference and computed labels
        assert len(pairs) == len(np.unique(ref[mask])) == len(np.unique(labels[mask]))


def test_keep_largest_keeps_one_component_per_mask():
    masks = torch.zeros(3, 12, 12, dtype=torch.bool)
    masks[0, 1:3, 1:3] = True                       # 4 px
    masks[0, 6:10, 6:10] = True                     # 16 px
    masks[0, 5, 5] = True                           # touches the 16 px block diagonally
    masks[1, 0, 0] = masks[1, 11, 11] = True        # a tie: the later pixel's component wins
    out = keep_largest(masks)
    expected0 = torch.zeros(12, 12, dtype=torch.bool)
    expected0[6:10, 6:10] = True
    expected0[5, 5] = True
    assert torch.equal(out[0], expected0)
    assert out[1].nonzero().tolist() == [[11, 11]]
    assert not out[2].any()                         # empty stays empty


def _bundle(tmp_path: Path, keep: bool | None = None) -> str:
    torch.manual_seed(0)
    inference = {"mode": "resize", "tile_overlap": 0.25}
    if keep is not None:
        inference["keep_largest"] = keep
    cfg = make_bundle_config(SEG_MODEL, task="segmentation", input_size=[32, 32],
                             mean=[0.5] * 3, std=[0.25] * 3, threshold=0.5, inference=inference)
    return save_bundle(str(tmp_path / "seg"), build_model(SEG_MODEL), cfg, version="v0")


def _two_blobs(batch: np.ndarray) -> torch.Tensor:
    probs = torch.full((len(batch), 32, 32), 0.05)
    probs[:, 4:8, 4:8] = 0.9       # small lesion
    probs[:, 16:28, 14:30] = 0.9   # large lesion
    return probs


@pytest.mark.parametrize("mode", ["resize", "tile"])
def test_segmenter_keeps_the_largest_lesion_at_original_size(tmp_path, mode):
    uri = _bundle(tmp_path, keep=True)
    image = np.zeros((64, 64, 3), dtype=np.uint8) if mode == "resize" else \
        np.zeros((32, 32, 3), dtype=np.uint8)
    masks = {}
    for keep in (False, True):
        seg = Segmenter(load_bundle(uri), mode=mode, tile_overlap=0,
                        keep_largest=None if keep else False)
        assert seg.keep_largest is keep
        seg._probabilities = _two_blobs
        masks[keep] = seg.predict([image])[0]
    scale = image.shape[0] // 32
    big = np.zeros(image.shape[:2], dtype=bool)
    big[16 * scale:28 * scale, 14 * scale:30 * scale] = True
    small = np.zeros(image.shape[:2], dtype=bool)
    small[4 * scale:8 * scale, 4 * scale:8 * scale] = True
    assert masks[False][small].all() and masks[False][big].all()
    assert not masks[True][small].any() and masks[True][big].all()
    assert masks[True].sum() == masks[False].sum() - small.sum()


def test_flip_averages_the_image_and_its_mirror(tmp_path):
    seg = Segmenter(load_bundle(_bundle(tmp_path)), flip=True)
    # a stand-in model that looks left (a running sum along x): mirroring changes its output
    seg.model = lambda x: x[:, :1].cumsum(-1)  # logits
    image = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    x = seg._normalize(image)[:, 0]
    expected = (torch.sigmoid(x.cumsum(-1)) + torch.sigmoid(x.flip(-1).cumsum(-1)).flip(-1)) / 2
    assert torch.allclose(seg._probabilities(image), expected)
    seg.flip = False
    assert torch.allclose(seg._probabilities(image), torch.sigmoid(x.cumsum(-1)))


def test_choose_postprocess_sets_the_bundle_from_validation_dice(tmp_path, synthetic_archive):
    records = list_records(synthetic_archive, "busi").records[:6]
    cfg = load_config([f"output_dir={tmp_path}", "data.image_size=[32,32]"])
    uri = _bundle(tmp_path)
    weights = load_bundle(uri).model.state_dict()
    scores = {name: train_pipeline.test_dice(uri, records, cfg, flip=flip,
                                             keep_largest=keep)["dice"]
              for name, (flip, keep) in POSTPROCESS.items()}
    best = max(scores.values())
    choice = choose_postprocess(uri, records, cfg)
    assert scores[choice] == best
    assert choice == next(n for n in POSTPROCESS if scores[n] == best)  # cheapest of the best
    bundle = load_bundle(uri)
    flip, keep = POSTPROCESS[choice]
    assert bundle.config["inference"].get("flip", False) is flip
    assert bundle.config["inference"].get("keep_largest", False) is keep
    assert bundle.version == ("v0" if choice == "none" else f"v0+{choice}")
    for mode in ("largest", "largest", "flip+largest", "none", "flip"):
        before = load_bundle(uri)
        cfg["train"]["postprocess"] = mode
        assert choose_postprocess(uri, records, cfg) == mode
        after = load_bundle(uri)
        flip, keep = POSTPROCESS[mode]
        assert after.config["inference"].get("flip", False) is flip
        assert after.config["inference"].get("keep_largest", False) is keep
        assert after.version == ("v0" if mode == "none" else f"v0+{mode}")
        if before.version == after.version:
            assert after.metrics == before.metrics  # the same setting: not rewritten
        else:
            assert after.metrics["postprocess"]["choice"] == mode
    after = load_bundle(uri).model.state_dict()
    assert all(torch.equal(weights[k], after[k]) for k in weights)
    cfg["train"]["postprocess"] = "biggest"
    with pytest.raises(ValueError, match="train.postprocess"):
        choose_postprocess(uri, records, cfg)
