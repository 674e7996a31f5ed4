"""Result rows (medseg_core.results) and the shared Ray Data prediction step (pipelines/predict.py)
against `inference.Chain` run in-process on the same files."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from medseg_core.checkpoint import make_bundle_config, save_bundle
from medseg_core.inference import Chain
from medseg_core.io import decode_mask, encode_mask_png, encode_png
from medseg_core.layouts import Record, list_records, load_record
from medseg_core.metrics import confusion_counts, dice, hausdorff95, iou, metrics_from_counts
from medseg_core.models import build_model
from medseg_core.results import (
    COUNT_KEYS,
    METRIC_KEYS,
    RESULT_KEYS,
    error_row,
    is_missing,
    prediction_row,
)

CLASS_NAMES = ["normal", "benign", "malignant"]
SEG_MODEL = {"name": "unet", "in_channels": 3, "widths": [4, 8]}
CLS_MODEL = {"name": "classifier", "in_channels": 3, "num_classes": 3, "widths": [4, 8]}
INPUT_SIZE = [48, 48]
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


# ----------------------------------------------------------------------------------------------
# Helpers shared with test_segment_batch.py


def _spread(model: torch.nn.Module, seed: int, scale: float) -> torch.nn.Module:
    """Untrained weights drawn wider, so outputs differ between images."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (scale if p.ndim > 1 else 0.1))
    return model.eval()


def save_bundles(root: str, storage_options: dict | None = None) -> tuple[str, str]:
    """A tiny segmentation bundle and a classifier whose label depends on the image."""
    seg = _spread(build_model(SEG_MODEL), 3, 0.25)
    clf = _spread(build_model(CLS_MODEL), 3, 0.5)
    with torch.no_grad():
        clf.fc.weight.mul_(10.0)
        clf.fc.bias.zero_()
    seg_cfg = make_bundle_config(SEG_MODEL, task="segmentation", input_size=INPUT_SIZE,
                                 mean=MEAN, std=STD)
    cls_cfg = make_bundle_config(CLS_MODEL, task="classification", input_size=INPUT_SIZE,
                                 mean=MEAN, std=STD, class_names=CLASS_NAMES)
    root = root.rstrip("/")
    return (save_bundle(f"{root}/seg", seg, seg_cfg, version="seg-v1",
                        storage_options=storage_options),
            save_bundle(f"{root}/cls", clf, cls_cfg, version="cls-v1",
                        storage_options=storage_options))


def sample_image(rng: np.random.Generator, low: int = 40, high: int = 90) -> np.ndarray:
    """A noisy image of a random size and brightness (grey or colour)."""
    h, w = (int(v) for v in rng.integers(low, high, size=2))
    base = rng.integers(0, 256, size=3)
    image = np.clip(base + rng.normal(0, 30, size=(h, w, 3)), 0, 255).astype(np.uint8)
    return image[:, :, 0] if rng.random() < 0.3 else image


def sample_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A random ellipse (sometimes empty)."""
    if rng.random() < 0.2:
        return np.zeros((h, w), np.uint8)
    yy, xx = np.mgrid[:h, :w]
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    ry, rx = rng.uniform(0.1, 0.3) * h, rng.uniform(0.1, 0.3) * w
    return (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).astype(np.uint8)


def make_busi_archive(root: Path, per_class: int = 3, seed: int = 0) -> Path:
    """``<class>/<class> (i).png`` + ``_mask.png`` with varied images and ellipse masks."""
    rng = np.random.default_rng(seed)
    for cls in CLASS_NAMES:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(1, per_class + 1):
            image = sample_image(rng)
            (root / cls / f"{cls} ({i}).png").write_bytes(encode_png(image))
            mask = sample_mask(rng, *image.shape[:2])
            (root / cls / f"{cls} ({i})_mask.png").write_bytes(encode_mask_png(mask))
    return root


def add_corrupt_files(root: Path) -> dict[str, str]:
    """Zero-byte, truncated PNG, text named .png, and a corrupt ground-truth mask; returns
    id -> a fragment the error must contain (the file name)."""
    good = encode_png(np.full((30, 40, 3), 120, np.uint8))
    mask = encode_mask_png(np.ones((30, 40), np.uint8))
    files = {
        "benign/zero bytes": (b"", mask),
        "benign/truncated": (good[: len(good) // 2], mask),
        "malignant/not an image": (b"this is a text file, not a PNG\n", mask),
        "normal/bad mask": (good, b"garbage mask bytes"),
    }
    expected = {}
    for rid, (image, mask_bytes) in files.items():
        (root / f"{rid}.png").write_bytes(image)
        (root / f"{rid}_mask.png").write_bytes(mask_bytes)
        name = f"{rid}_mask.png" if rid.endswith("bad mask") else f"{rid}.png"
        expected[rid] = name
    return expected


def reference(seg_uri: str, cls_uri: str | None, records: list[Record],
              storage_options: dict | None = None) -> dict[str, dict]:
    """In-process Chain on the records that decode: id -> output (+ "truth")."""
    chain = Chain.from_uris(seg_uri, cls_uri, storage_options=storage_options)
    out = {}
    for rec in records:
        try:
            sample = load_record(rec)
        except (ValueError, OSError):  # undecodable or missing: an error row in the job
            continue
        result = chain.predict([sample["image"]])[0]
        result["truth"] = sample["mask"] if rec.mask_uris else None
        out[rec.id] = result
    return out


def assert_matches(row: dict, ref: dict) -> None:
    """A result row (with mask bytes or a mask array) equals the in-process Chain output."""
    assert row["error"] is None, row["error"]
    assert row["label"] == ref["label"]
    assert row["label_name"] == ref["label_name"]
    np.testing.assert_allclose(row["probabilities"], list(ref["probabilities"].values()),
                               atol=1e-5)
    assert row["lesion_area_fraction"] == pytest.approx(ref["lesion_area_fraction"], abs=1e-12)
    assert row["bbox"] == ref["bbox"]
    assert (row["height"], row["width"]) == ref["mask"].shape


def decode_png_mask(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "L"
        return (np.asarray(im) > 0).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# medseg_core.results


def _output(mask: np.ndarray) -> dict:
    return {"mask": mask, "label": 2, "label_name": "malignant",
            "probabilities": {"normal": 0.1, "benign": 0.2, "malignant": 0.7},
            "lesion_area_fraction": float(mask.mean()), "bbox": [1, 2, 5, 6]}


def test_prediction_row_with_truth_uses_medseg_metrics():
    rng = np.random.default_rng(1)
    mask = sample_mask(np.random.default_rng(5), 40, 50)
    truth = sample_mask(rng, 40, 50)
    row = prediction_row("a/b", "s3://x/a/b.png", _output(mask), truth=truth, true_label=1,
                         seconds=0.25, versions={"segmenter": "s1", "classifier": "c1"})
    assert tuple(row) == RESULT_KEYS
    counts = confusion_counts(mask, truth)[0]
    assert [row[k] for k in COUNT_KEYS] == [int(c) for c in counts]
    expected = metrics_from_counts(counts)
    for key in METRIC_KEYS:
        if key != "hd95":
            assert row[key] == expected[key]
    assert row["dice"] == dice(counts) and row["iou"] == iou(counts)
    assert row["hd95"] == hausdorff95(mask, truth)
    assert row["probabilities"] == [0.1, 0.2, 0.7]  # the bundle's class order
    assert row["label"] == 2 and row["label_name"] == "malignant" and row["true_label"] == 1
    assert (row["height"], row["width"]) == (40, 50) and row["bbox"] == [1, 2, 5, 6]
    assert row["segmenter_version"] == "s1" and row["classifier_version"] == "c1"
    assert row["error"] is None and row["seconds"] == 0.25
    no_hd = prediction_row("a", "a.png", _output(mask), truth=truth, hausdorff=False)
    assert math.isnan(no_hd["hd95"]) and no_hd["dice"] == row["dice"]


def test_prediction_row_without_truth_and_error_row_share_keys():
    row = prediction_row("a", "a.png", _output(np.zeros((4, 4), np.uint8)))
    assert tuple(row) == RESULT_KEYS
    assert all(row[k] is None for k in COUNT_KEYS)
    assert all(math.isnan(row[k]) for k in METRIC_KEYS)
    err = error_row("b", "b.png", "b.png: empty file", true_label=2, seconds=0.5,
                    versions={"segmenter": "s", "classifier": None})
    assert tuple(err) == RESULT_KEYS
    assert err["error"] == "b.png: empty file" and err["label"] == -1 and err["true_label"] == 2
    assert err["segmenter_version"] == "s" and err["classifier_version"] is None
    assert all(is_missing(err[k]) for k in (
        "label_name", "probabilities", "lesion_area_fraction", "bbox", "height", "width",
        *COUNT_KEYS, *METRIC_KEYS))


# ----------------------------------------------------------------------------------------------
# pipelines/predict.py


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return save_bundles(str(tmp_path_factory.mktemp("bundles")))


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = make_busi_archive(tmp_path_factory.mktemp("archive") / "busi", per_class=3)
    return root, add_corrupt_files(root)


def _batch(records: list[Record]) -> dict[str, np.ndarray]:
    """A numpy batch exactly as Ray Data hands it to map_batches."""
    masks = np.empty(len(records), dtype=object)
    for i, r in enumerate(records):
        masks[i] = np.array(r.mask_uris, dtype=object)
    return {"id": np.array([r.id for r in records], dtype=object),
            "image_uri": np.array([r.image_uri for r in records], dtype=object),
            "mask_uris": masks, "label": np.array([r.label for r in records])}


def test_chain_predictor_batch_equals_chain_and_turns_bad_files_into_rows(bundles, archive):
    from pipelines.predict import ChainPredictor, result_schema

    root, bad = archive
    records = list_records(str(root), "busi").records
    missing = Record("benign/vanished", str(root / "benign" / "vanished.png"), (), 1)
    records = [*records, missing]
    predictor = ChainPredictor(*bundles, io_threads=4)
    table = predictor(_batch(records))
    assert isinstance(table, pa.Table) and table.schema == result_schema(True)
    rows = {r["id"]: r for r in table.to_pylist()}
    assert list(rows) == [r.id for r in records]  # order kept
    ref = reference(*bundles, records)
    assert set(ref) == {r.id for r in records} - set(bad) - {missing.id}
    for rid, out in ref.items():
        row = rows[rid]
        assert_matches(row, out)
        np.testing.assert_array_equal(decode_png_mask(row["mask_png"]), out["mask"])
        counts = confusion_counts(out["mask"], out["truth"])[0]
        assert [row[k] for k in COUNT_KEYS] == [int(c) for c in counts]
        assert row["dice"] == pytest.approx(dice(counts))
        assert row["segmenter_version"] == "seg-v1" and row["classifier_version"] == "cls-v1"
        assert row["seconds"] > 0
    for rid, name in bad.items():
        assert rows[rid]["error"] is not None and name in rows[rid]["error"], rows[rid]["error"]
        assert rows[rid]["mask_png"] is None and rows[rid]["label"] == -1
    assert "vanished.png" in rows[missing.id]["error"]
    assert len({r["label"] for r in rows.values() if r["error"] is None}) >= 2  # varied labels


def test_an_image_too_thin_for_tile_inference_is_an_error_row(bundles, tmp_path):
    from pipelines.predict import ChainPredictor

    thin, square = tmp_path / "thin.png", tmp_path / "square.png"
    thin.write_bytes(encode_png(np.full((1, 2000, 3), 90, np.uint8)))
    square.write_bytes(encode_png(np.full((60, 60, 3), 90, np.uint8)))
    predictor = ChainPredictor(*bundles, with_truth=False)
    seg = predictor.chain.segmenter
    seg.mode, seg.max_work_pixels = "tile", 20 * 48 * 48  # as a tile-mode bundle would run
    rows = predictor(_batch([Record("thin", str(thin)), Record("square", str(square))]))
    rows = {r["id"]: r for r in rows.to_pylist()}
    assert "1x2000 image: tile inference would run the model over" in rows["thin"]["error"]
    assert rows["square"]["error"] is None and rows["square"]["mask_png"] is not None


@pytest.mark.ray
def test_predict_records_on_ray_equals_chain_in_process(ray_cluster, bundles, archive):
    from pipelines.predict import predict_records

    root, bad = archive
    records = list_records(str(root), "busi").records
    ds = predict_records(records, seg_uri=bundles[0], cls_uri=bundles[1], batch_size=4,
                         concurrency=(1, 2))
    rows = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in batch.to_pylist():
            assert row["id"] not in rows
            rows[row["id"]] = row
    assert set(rows) == {r.id for r in records}
    ref = reference(*bundles, records)
    for rid, out in ref.items():
        assert_matches(rows[rid], out)
        np.testing.assert_array_equal(decode_png_mask(rows[rid]["mask_png"]), out["mask"])
    assert sorted(r for r in rows if rows[r]["error"] is not None) == sorted(bad)
    # masks at the original resolution
    for rid, out in ref.items():
        assert decode_mask(rows[rid]["mask_png"]).shape == out["mask"].shape


def test_the_bulk_jobs_amp_setting_reaches_both_models(bundles, fake_native_bf16):
    """`batch.amp=true` on CPU actors: bf16 where the CPU has it (see test_inference)."""
    import torch

    from pipelines.predict import ChainPredictor

    fake_native_bf16(True)
    for amp, dtype in ((None, None), (False, None), (True, torch.bfloat16)):
        chain = ChainPredictor(*bundles, amp=amp).chain
        assert chain.segmenter.amp_dtype == chain.classifier.amp_dtype == dtype
