"""Evaluation: per-image table == medseg_core.metrics, bootstrap intervals, classifier scores,
case selection, flip TTA, and the evaluate job in-process and on Ray Data (same rows)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from medseg_core import metrics as M
from medseg_core.checkpoint import load_bundle, make_bundle_config, save_bundle
from medseg_core.evaluation import (
    BootstrapConfig,
    FlipTTA,
    bootstrap_weights,
    classification_summary,
    flip_tta,
    global_metric_ci,
    mean_ci,
    select_cases,
    summarize,
    table_records,
)
from medseg_core.inference import Segmenter
from medseg_core.layouts import Record, load_record
from medseg_core.models import build_model
from medseg_core.results import error_row, prediction_row
from medseg_core.synthetic import make_sample

CLASS_NAMES = ["normal", "benign", "malignant"]
SEG_MODEL = {"name": "unet", "in_channels": 3, "widths": [4, 8]}
CLS_MODEL = {"name": "classifier", "in_channels": 3, "num_classes": 3, "widths": [4, 8]}
METRICS = ("dice", "iou", "thresholded_jaccard", "sensitivity", "specificity", "precision",
           "recall")
FAST_BOOT = ["evaluate.bootstrap.samples=300"]


# ---------------------------------------------------------------------------------- fixtures
def _spread(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Larger random weights so that masks vary across pixels and images."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.25 if p.ndim > 1 else 0.1))
    return model.eval()


def make_run(root: Path) -> Path:
    """A training run's layout with tiny bundles and a segmenter log (metrics.csv)."""
    run = root / "runs" / "tiny"
    seg_cfg = make_bundle_config(SEG_MODEL, task="segmentation", input_size=[32, 32],
                                 mean=[0.5] * 3, std=[0.25] * 3, threshold=0.5,
                                 class_names=CLASS_NAMES)
    save_bundle(str(run / "segmenter" / "best"), _spread(build_model(SEG_MODEL), 0), seg_cfg,
                version="v-seg")
    cls_cfg = make_bundle_config(CLS_MODEL, task="classification", input_size=[32, 32],
                                 mean=[0.5] * 3, std=[0.25] * 3, threshold=None,
                                 class_names=CLASS_NAMES)
    save_bundle(str(run / "classifier" / "best"), _spread(build_model(CLS_MODEL), 1), cls_cfg,
                version="v-cls")
    with open(run / "segmenter" / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["epoch", "train_loss", "val_loss", "val_dice"])
        w.writeheader()
        for e in range(4):
            w.writerow({"epoch": e, "train_loss": 1 / (e + 1), "val_loss": 1.1 / (e + 1),
                        "val_dice": 0.4 + 0.1 * e})
    return run


def eval_config(root: Path, archive: str, *extra: str) -> dict:
    from pipelines.config import load_config

    run = root / "runs" / "tiny"
    return load_config([
        f"output_dir={root}", "run_name=tiny", f"data.url={archive}",
        f"evaluate.segmenter={run / 'segmenter' / 'best'}",
        f"evaluate.classifier={run / 'classifier' / 'best'}",
        *FAST_BOOT, *extra,
    ], config_name="evaluate")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, synthetic_archive) -> tuple[Path, str]:
    """Bundles in a run layout, and a copy of the synthetic archive with one corrupt mask (the
    image still hashes and lists, so the failure happens at evaluation: an error row)."""
    root = tmp_path_factory.mktemp("evaluate")
    make_run(root)
    archive = root / "archive"
    shutil.copytree(synthetic_archive, archive)
    (archive / "benign" / "benign (2)_mask.png").write_bytes(b"not a png")
    return root, str(archive)


@pytest.fixture(scope="module")
def local_run(workspace) -> tuple[dict, Path, dict]:
    """The evaluate job in-process on every image, with flip TTA."""
    from pipelines.evaluate import evaluate

    root, archive = workspace
    cfg = eval_config(root, archive, "evaluate.split=all", "evaluate.tta.enabled=true",
                      f"evaluate.out={root / 'eval-local'}")
    summary = evaluate(cfg)
    return summary, root / "eval-local", cfg


def _records(cfg: dict) -> list[Record]:
    from pipelines.evaluate import select_records

    return select_records(cfg)


# ---------------------------------------------------------------------------------- the job
def test_table_metrics_equal_core_metrics(local_run) -> None:
    """Every number of per_image.parquet/csv is medseg_core.metrics on the same masks: the
    segmenter's (with TTA: FlipTTA's) prediction against the ground truth."""
    summary, out, cfg = local_run
    seg = Segmenter(load_bundle(cfg["evaluate"]["segmenter"]))
    variants = {"per_image": flip_tta(seg), "per_image_no_tta": seg}
    records = {r.id: r for r in _records(cfg)}
    for name, predictor in variants.items():
        table = pq.read_table(out / f"{name}.parquet").to_pylist()
        assert [r["id"] for r in table] == sorted(records)
        with open(out / f"{name}.csv") as f:
            assert [r["id"] for r in csv.DictReader(f)] == sorted(records)
        good = [row for row in table if not row["error"]]
        assert len(good) == len(records) - 1
        samples = [load_record(records[row["id"]]) for row in good]
        preds = predictor.predict([s["image"] for s in samples])
        for row, sample, pred in zip(good, samples, preds):
            counts = M.confusion_counts(pred, sample["mask"])[0]
            assert [row[k] for k in ("tp", "fp", "fn", "tn")] == counts.tolist()
            for m in METRICS:
                assert row[m] == pytest.approx(float(getattr(M, m)(counts)), abs=1e-12), m
            assert row["hd95"] == pytest.approx(M.hausdorff95(pred, sample["mask"]))
            assert row["true_class"] == CLASS_NAMES[records[row["id"]].label]
            assert row["pred_class"] in CLASS_NAMES


def test_job_outputs_summary_and_error_rows(local_run) -> None:
    summary, out, _ = local_run
    for name in ("report.html", "summary.json", "per_image.parquet", "per_image.csv",
                 "per_image_no_tta.parquet", "figures/cases.png",
                 "figures/confusion_matrix.png", "figures/curves_segmenter.png"):
        assert (out / name).is_file(), name
    assert not (out / "figures" / "curves_classifier.png").exists()  # no log next to it
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["segmentation"] == summary["segmentation"]
    # the corrupt mask is an error row naming the file, counted and listed, not a crash
    assert on_disk["n_images"] == 15 and on_disk["n_errors"] == 1
    assert "benign (2)_mask.png" in on_disk["errors"][0]["error"]
    table = pq.read_table(out / "per_image.parquet").to_pylist()
    bad = [r for r in table if r["error"]]
    assert len(bad) == 1 and bad[0]["dice"] is None
    # aggregates, per class, TTA effect and classifier scores are all there
    groups = on_disk["segmentation"]["groups"]
    assert set(groups) == {"all", *CLASS_NAMES}
    assert groups["all"]["n"] == 14
    dice = groups["all"]["dice"]
    assert dice["mean_ci"][0] <= dice["mean"] <= dice["mean_ci"][1]
    assert dice["global_ci"][0] <= dice["global"] <= dice["global_ci"][1]
    tta = on_disk["tta"]
    assert tta["n"] == 14 and set(tta["metrics"]) == set(METRICS)
    no_tta = [r for r in pq.read_table(out / "per_image_no_tta.parquet").to_pylist()
              if not r["error"]]
    assert tta["metrics"]["dice"]["without_mean"] == pytest.approx(
        np.mean([r["dice"] for r in no_tta]))
    cls = on_disk["classification"]
    assert np.array(cls["confusion"]).sum() == cls["n"] == 14
    assert [c["which"] for c in on_disk["cases"]] == ["best", "median", "worst"]
    run = on_disk["run"]
    assert run["tta"] == ["identity", "hflip", "vflip"] and run["backend"] == "local"
    assert run["bundles"]["segmenter"]["version"] == "v-seg"
    assert run["bundles"]["classifier"]["version"] == "v-cls"
    page = (out / "report.html").read_text()
    assert "http://" not in page and "https://" not in page  # self-contained


def test_class_names_must_match_the_classifier_bundle(workspace) -> None:
    """The bundle's probabilities follow its own class order and the labels data.class_names':
    a different order would score every prediction against the wrong class."""
    from pipelines.evaluate import evaluate

    root, archive = workspace
    cfg = eval_config(root, archive, "data.class_names=[benign,malignant,normal]",
                      "+data.options.class_names=[benign,malignant,normal]",
                      "evaluate.split=all", f"evaluate.out={root / 'eval-names'}")
    with pytest.raises(ValueError, match=r"predicts classes \['normal', 'benign', 'malignant'\]"):
        evaluate(cfg)


def test_class_names_must_be_the_layouts(workspace) -> None:
    """The layout labels each record by its own class names: other data.class_names (here
    reordered) named every label after another class, in reports and bundles alike."""
    from medseg_core.layouts import LayoutError
    from pipelines.evaluate import evaluate
    from pipelines.train import run

    root, archive = workspace
    names = "data.class_names=[benign,malignant,normal]"
    with pytest.raises(LayoutError, match=r"labels records by class names \['normal', 'benign', "
                       r"'malignant'\], but data.class_names is \['benign'"):
        evaluate(eval_config(root, archive, names, "evaluate.split=all", "evaluate.classifier=null",
                             f"evaluate.out={root / 'eval-names2'}"))
    with pytest.raises(LayoutError, match="data.class_names=\\[\"normal\",\"benign\""):
        from pipelines.config import load_config

        # in-process: the session's 2-CPU Ray cluster has no room for the default Ray group
        run(load_config([f"output_dir={root / 'train-names'}", f"data.url={archive}", names,
                         "trainer=local"]))


def test_a_packed_archive_without_masks_has_no_ground_truth(workspace) -> None:
    """A pack of an images-only archive holds no masks: its rows are scored against nothing,
    as the raw archive's are (a missing packed mask decoded as an empty truth, and Dice 0 was
    reported for every image)."""
    from pipelines.config import load_config
    from pipelines.evaluate import evaluate
    from pipelines.pack import pack_archive

    root, archive = workspace
    images = root / "images-only"
    for f in Path(archive).glob("*/*.png"):
        if "_mask" not in f.name:
            (images / f.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, images / f.parent.name / f.name)
    common = ["data.layout=images", "data.class_names=[]", "data.split.dedup_distance=-1"]
    pack_archive(load_config([f"output_dir={root}", f"data.url={images}", *common,
                              f"pack.out={root / 'packed-images'}", "pack.backend=local"],
                             config_name="pack"))
    summaries = {}
    for name, url, layout in (("raw", images, "images"), ("packed", root / "packed-images",
                                                          "packed")):
        summaries[name] = evaluate(eval_config(
            root, str(url), *common, f"data.layout={layout}", "evaluate.split=all",
            "evaluate.classifier=null", "evaluate.hausdorff=false",
            f"evaluate.out={root / f'eval-{name}-images'}"))
    raw, packed = summaries["raw"], summaries["packed"]
    assert packed["n_images"] == raw["n_images"] == len(list(images.glob("*/*.png")))
    assert packed["n_evaluated"] == raw["n_evaluated"] == 0
    assert {e["error"] for e in packed["errors"]} == {e["error"] for e in raw["errors"]}


def test_bad_settings_are_refused_before_any_prediction(workspace, monkeypatch) -> None:
    """Bootstrap settings were checked only after every image was predicted; limit=0 meant all
    and a negative one dropped the last images; no flips meant the default three."""
    import pipelines.evaluate as ev

    root, archive = workspace
    monkeypatch.setattr(ev, "predict_local", lambda *a: pytest.fail("predicted first"))
    for bad, message in (("evaluate.bootstrap.confidence=1.5",
                          "evaluate.bootstrap: confidence must be in"),
                         ("evaluate.bootstrap.samples=0", "samples must be a whole number"),
                         ("evaluate.bootstrap.samples=2.7", "samples must be a whole number"),
                         ("evaluate.bootstrap.seed=-1", "seed must be a whole number"),
                         ("evaluate.limit=0", "evaluate.limit must be"),
                         ("evaluate.device=bogus", "evaluate.device must be auto, cpu, cuda"),
                         # torch's AssertionError after listing, as a traceback
                         ("evaluate.device=cuda:63", r"evaluate.device=cuda:63, but torch sees "
                          r"\d+ CUDA device\(s\) here"),

                         ("evaluate.limit=-2", "evaluate.limit must be"),
                         ("evaluate.tta.flips=[]", "tta.flips must name"),
                         ("evaluate.tta.flips=[mirror]", "tta.flips must name"),
                         # inside the prediction, or after it (the report), or not at all
                         ("evaluate.batch_size=0", "evaluate.batch_size must be"),
                         ("evaluate.report.cell=0", "evaluate.report.cell must be"),
                         ("evaluate.report.max_rows=-1", "evaluate.report.max_rows must be"),
                         ("evaluate.auto_ray_min_images=abc", "auto_ray_min_images must be"),
                         ("evaluate.ray.concurrency=[2,1]", "evaluate.ray.concurrency must be"),
                         ("evaluate.ray.num_cpus=0", "evaluate.ray.num_cpus must be"),
                         ("evaluate.ray.local_num_cpus=0", "ray.local_num_cpus must be")):
        cfg = eval_config(root, archive, bad, "evaluate.tta.enabled=true", "evaluate.split=all",
                          f"evaluate.out={root / 'eval-bad'}")
        with pytest.raises(ValueError, match=message):
            ev.evaluate(cfg)
    # the Ray backend and a packed archive: refused after listing it before
    with pytest.raises(ValueError, match="evaluate.backend=ray .* cannot read packed archives"):
        ev.evaluate(eval_config(root, archive, "evaluate.backend=ray", "data.layout=packed",
                                "evaluate.split=all", f"evaluate.out={root / 'eval-bad'}"))
    for bad in ("evaluate.tta.flips=[]", "evaluate.tta.flips=[rot90]"):  # with TTA off too
        cfg = eval_config(root, archive, bad, "evaluate.split=all",
                          f"evaluate.out={root / 'eval-bad'}")
        with pytest.raises(ValueError, match="tta.flips must name"):
            ev.evaluate(cfg)
    # a class named as a report group: refused once every image was predicted
    with pytest.raises(ValueError, match=r"data.class_names: class names \['all'\] are reserved"):
        ev.evaluate(eval_config(root, archive, "data.class_names=[all,benign,malignant]",
                                "+data.options.class_names=[all,benign,malignant]",
                                "evaluate.classifier=null", "evaluate.split=all",
                                f"evaluate.out={root / 'eval-bad'}"))
    # a split of the training run's settings: refused after listing, as `fold` alone
    monkeypatch.setattr(ev, "select_records", lambda *a: pytest.fail("listed first"))
    for bad, message in ((["data.split.mode=kfold", "data.split.fold=5"],
                          "data.split.fold must be a whole number from 0 to 4, got 5"),
                         (["data.split.ratios=[0.8,-0.1,0.3]"], "data.split.ratios must be")):
        with pytest.raises(ValueError, match=message):
            ev.evaluate(eval_config(root, archive, *bad, "evaluate.split=test",
                                    f"evaluate.out={root / 'eval-bad'}"))


def test_a_missing_bundle_or_one_of_another_task_is_refused_first(workspace, monkeypatch):
    """A classifier bundle given as the segmenter (or the reverse) made an error row of every
    image, blaming the image, and a missing bundle was said to have "no version"."""
    import pipelines.evaluate as ev

    root, archive = workspace
    run = root / "runs" / "tiny"
    monkeypatch.setattr(ev, "select_records", lambda *a: pytest.fail("read images first"))
    monkeypatch.setattr(ev, "predict_local", lambda *a: pytest.fail("predicted first"))
    for bad, message in (
            ([f"evaluate.segmenter={run / 'classifier' / 'best'}", "evaluate.classifier=null"],
             r"^evaluate.segmenter: model bundle \S+/classifier/best is a 'classification' "
             r"bundle; evaluate.segmenter needs a 'segmentation' one$"),
            ([f"evaluate.classifier={run / 'segmenter' / 'best'}"],
             r"^evaluate.classifier: model bundle \S+/segmenter/best is a 'segmentation' "
             r"bundle; evaluate.classifier needs a 'classification' one$"),
            ([f"evaluate.segmenter={root / 'nosuch'}"],
             r"^evaluate.segmenter: model bundle \S+/nosuch does not exist$"),
            ([f"evaluate.classifier={root / 'runs' / 'nosuch' / 'classifier' / 'best'}"],
             r"^evaluate.classifier: model bundle \S+/nosuch/classifier/best does not exist "
             r"\(evaluate.classifier=null evaluates the segmenter alone\)$")):
        cfg = eval_config(root, archive, *bad, f"evaluate.out={root / 'eval-wrong'}")
        with pytest.raises(ValueError, match=message):
            ev.evaluate(cfg)
    assert not (root / "eval-wrong").exists()


def test_bad_inputs_are_reported_beside_the_evaluation(workspace) -> None:
    """The bad-input report went to data.report inherited from training, overwriting the
    training run's data_report.json with the evaluation's problems."""
    from pipelines.evaluate import select_records

    root, archive = workspace
    training_report = root / "runs" / "tiny" / "data_report.json"
    training_report.unlink(missing_ok=True)
    out = root / "eval-bad-input"
    cfg = eval_config(root, archive, "evaluate.split=test", f"evaluate.out={out}")
    assert cfg["data"]["report"] == f"{out}/data_report.json"
    with pytest.warns(UserWarning, match="dropped"):
        records = select_records(cfg)  # the corrupt mask is dropped before the split
    assert "benign/benign (2)" not in {r.id for r in records}
    report = json.loads((out / "data_report.json").read_text())
    assert [e["path"].rsplit("/", 1)[-1] for e in report["entries"]] == ["benign (2)_mask.png"]
    assert not training_report.exists()


def test_a_rerun_into_the_same_folder_leaves_no_file_of_the_earlier_one(workspace, local_run,
                                                                         tmp_path) -> None:
    """An evaluation into the folder of an earlier one kept that one's per_image_no_tta.*
    beside a summary without TTA, its confusion matrix without a classifier, and its
    data_report.json naming a file that was no longer there."""
    from pipelines.evaluate import evaluate

    root, archive = workspace
    out = tmp_path / "eval"
    shutil.copytree(local_run[1], out)  # with TTA and the classifier
    assert (out / "per_image_no_tta.csv").exists()
    assert (out / "figures" / "confusion_matrix.png").exists()
    plain = ["evaluate.split=test", "evaluate.classifier=null", f"evaluate.out={out}"]
    with pytest.warns(UserWarning, match="dropped"):
        evaluate(eval_config(root, archive, *plain))
    assert not (out / "per_image_no_tta.csv").exists()
    assert not (out / "per_image_no_tta.parquet").exists()
    assert not (out / "figures" / "confusion_matrix.png").exists()
    assert (out / "figures" / "cases.png").exists() and (out / "data_report.json").exists()
    clean = tmp_path / "clean"  # the bad mask's record gone from the archive
    shutil.copytree(archive, clean)
    for name in ("benign (2).png", "benign (2)_mask.png"):
        (clean / "benign" / name).unlink()
    evaluate(eval_config(root, str(clean), *plain))
    assert not (out / "data_report.json").exists()
    # nor where this run sends its report elsewhere (or nowhere)
    with pytest.warns(UserWarning, match="dropped"):
        evaluate(eval_config(root, archive, *plain))
    assert (out / "data_report.json").exists()
    with pytest.warns(UserWarning, match="dropped"):
        evaluate(eval_config(root, archive, *plain, "data.report=null"))
    assert not (out / "data_report.json").exists()


def test_split_is_the_training_split(workspace, capsys) -> None:
    """split=test evaluates exactly the held-out split of pipelines.data.load_splits."""
    from pipelines.data import load_splits
    from pipelines.evaluate import evaluate

    root, archive = workspace
    cfg = eval_config(root, archive, "evaluate.split=test", "evaluate.hausdorff=false",
                      "data.split.ratios=[0.6,0.2,0.2]",
                      "evaluate.classifier=null", f"evaluate.out={root / 'eval-test'}")
    summary = evaluate(cfg, release=lambda: print("RELEASED"))
    # the closing lines come after the entry point has left Ray (pipelines.cluster.disconnect)
    out = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    released = out.index("RELEASED")
    closing = [line for line in out[released + 1:] if line.startswith(("report: ", "summary: "))]
    assert "images evaluated" in out[released + 1] and len(closing) == 2, out
    assert not any(line.startswith(("report: ", "summary: ")) for line in out[:released])
    expected = sorted(r.id for r in load_splits(cfg)["test"])
    table = pq.read_table(root / "eval-test" / "per_image.parquet").to_pylist()
    assert [r["id"] for r in table] == expected and expected
    assert summary["classification"] is None and summary["tta"] is None
    assert "hd95" not in summary["segmentation"]["groups"]["all"]
    with pytest.raises(ValueError, match="evaluate.split"):
        evaluate(eval_config(root, archive, "evaluate.split=holdout"))


def test_a_split_other_than_the_one_the_run_held_out_is_refused(tmp_path, synthetic_archive):
    """Training records each split's ids (runs/<run>/splits.json); evaluating a split that
    now holds other records (another data.split, or medseg's split changed since training) is
    refused rather than scoring images the model may have been trained or selected on."""
    from pipelines.data import load_splits
    from pipelines.evaluate import select_records
    from pipelines.runlog import read_splits, record_splits

    make_run(tmp_path)
    run = tmp_path / "runs" / "tiny"
    cfg = eval_config(tmp_path, synthetic_archive, "evaluate.split=test")
    assert select_records(cfg)  # no splits.json (a run from before): nothing to compare
    record_splits(str(run), {k: [r.id for r in v] for k, v in load_splits(cfg).items()})
    assert set(read_splits(str(run))) == {"train", "val", "test"}
    assert [r.id for r in select_records(cfg)] == [r.id for r in load_splits(cfg)["test"]]
    moved = eval_config(tmp_path, synthetic_archive, "evaluate.split=test",
                        "data.split.ratios=[0.6,0.2,0.2]")
    with pytest.raises(ValueError, match="not the one run .* held out"):
        select_records(moved)
    assert select_records(eval_config(tmp_path, synthetic_archive, "evaluate.split=all",
                                      "data.split.ratios=[0.6,0.2,0.2]"))
    # an in-process trainer left a bad record out of its splits (grouping off): the split is
    # still the run's, though evaluation keeps the record (it becomes an error row)
    archive = tmp_path / "bad-archive"
    shutil.copytree(synthetic_archive, archive)
    (archive / "benign" / "benign (2)_mask.png").write_bytes(b"not a png")
    nodedup = eval_config(tmp_path, str(archive), "evaluate.split=all",
                          "data.split.dedup_distance=-1")
    (run / "splits.json").unlink()
    record_splits(str(run), {k: [r.id for r in v]
                             for k, v in load_splits(nodedup, check=True).items()})
    for split in ("train", "val", "test"):
        select_records({**nodedup, "evaluate": {**nodedup["evaluate"], "split": split}})
    # training warns on a rerun whose splits moved, and keeps the first record
    assert record_splits(str(run), {k: [r.id for r in v]
                                    for k, v in load_splits(moved).items()}) == ["test", "train",
                                                                                 "val"]


@pytest.mark.ray
def test_ray_backend_gives_the_same_rows(ray_cluster, workspace, local_run) -> None:
    """backend=ray (the shared Ray Data step) gives the same table and summary as in-process."""
    from pipelines.evaluate import evaluate

    summary, out, _ = local_run
    root, archive = workspace
    cfg = eval_config(root, archive, "evaluate.split=all", "evaluate.tta.enabled=true",
                      "evaluate.backend=ray", "evaluate.ray.concurrency=1",
                      f"evaluate.out={root / 'eval-ray'}")
    ray_summary = evaluate(cfg)
    for name in ("per_image", "per_image_no_tta"):
        a = pq.read_table(out / f"{name}.parquet").drop(["seconds"]).to_pylist()
        b = pq.read_table(root / "eval-ray" / f"{name}.parquet").drop(["seconds"]).to_pylist()
        assert a == b
    assert ray_summary["run"]["backend"] == "ray"
    for key in ("segmentation", "classification", "tta", "cases", "n_errors"):
        assert ray_summary[key] == summary[key], key
    assert (root / "eval-ray" / "figures" / "cases.png").is_file()


@pytest.mark.ray
def test_ray_backend_refuses_actors_the_local_cluster_can_never_hold(ray_cluster,
                                                                     workspace) -> None:
    """A GPU asked for on a machine without one waited for ever (the bulk job and training
    already refused it)."""
    from pipelines.evaluate import evaluate

    root, archive = workspace
    cfg = eval_config(root, archive, "evaluate.split=all", "evaluate.backend=ray",
                      "evaluate.ray.num_gpus=1", f"evaluate.out={root / 'eval-gpu'}")
    with pytest.raises(RuntimeError, match=r"one actor of evaluation's pool needs 1 CPU, 1 GPU.*"
                                           r"wait for ever.*evaluate\.ray\.num_gpus=0"):
        evaluate(cfg)


@pytest.mark.ray
def test_ray_backend_reads_the_bundles_with_their_own_storage_settings(
        ray_cluster, workspace, s3, monkeypatch) -> None:
    """A local archive and a segmenter on a store `data.endpoint_url` names: the driver checked
    the bundle there, and the Ray actors looked for it with the archive's options (none: the
    environment's store) and failed."""
    from s3server import start_moto

    from pipelines.evaluate import evaluate

    root, archive = workspace
    for key, value in s3.env.items():  # the environment names another store
        monkeypatch.setenv(key, value)
    models = start_moto()
    try:
        models.upload_dir(str(root / "runs" / "tiny" / "segmenter" / "best"), "s3://models/seg")
        cfg = eval_config(root, archive, "evaluate.split=all", "evaluate.backend=ray",
                          "evaluate.ray.concurrency=1", "evaluate.segmenter=s3://models/seg",
                          "evaluate.classifier=null", f"data.endpoint_url={models.endpoint}",
                          f"evaluate.out={root / 'eval-ray-s3'}")
        summary = evaluate(cfg)
    finally:
        models.stop()
    assert summary["run"]["backend"] == "ray"
    assert (summary["n_images"], summary["n_errors"]) == (15, 1)  # the workspace's corrupt mask
    assert "benign (2)_mask.png" in summary["errors"][0]["error"]

@pytest.mark.ray
def test_both_backends_refuse_files_over_data_max_bytes(ray_cluster, workspace) -> None:
    from pipelines.evaluate import evaluate

    root, archive = workspace
    sizes = sorted(p.stat().st_size for p in Path(archive).rglob("*.png"))
    limit = sizes[len(sizes) // 2]
    rows = {}
    for backend in ("local", "ray"):
        out = root / f"eval-bytes-{backend}"
        evaluate(eval_config(root, archive, "evaluate.split=all", f"data.max_bytes={limit}",
                             f"evaluate.backend={backend}", "evaluate.ray.concurrency=1",
                             f"evaluate.out={out}"))
        rows[backend] = pq.read_table(out / "per_image.parquet").drop(["seconds"]).to_pylist()
    assert rows["local"] == rows["ray"]
    errors = [r["error"] for r in rows["ray"] if r["error"]]
    assert 0 < len(errors) < len(rows["ray"])
    assert all(f"more than max_bytes ({limit})" in e for e in errors), errors


@pytest.mark.s3
def test_archive_bundles_and_report_on_object_storage(s3, workspace, local_run, monkeypatch):
    """Everything on a real S3-compatible server (credentials from the environment only): the
    same rows as from local files."""
    import fsspec

    from pipelines.evaluate import evaluate

    root, archive = workspace
    s3.upload_dir(archive, "s3://medseg-eval/archive")
    s3.upload_dir(root / "runs", "s3://medseg-eval/runs")
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    cfg = eval_config(root, "s3://medseg-eval/archive", "evaluate.split=all",
                      f"data.endpoint_url={s3.endpoint}", "data.region=us-east-1",
                      "evaluate.segmenter=s3://medseg-eval/runs/tiny/segmenter/best",
                      "evaluate.classifier=s3://medseg-eval/runs/tiny/classifier/best",
                      "evaluate.out=s3://medseg-eval/eval")
    summary = evaluate(cfg)
    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": s3.endpoint})
    assert {p.rsplit("/", 1)[-1] for p in fs.ls("medseg-eval/eval")} >= {
        "report.html", "summary.json", "per_image.parquet", "per_image.csv", "figures"}
    assert json.loads(fs.cat_file("medseg-eval/eval/summary.json"))["segmentation"] == \
        summary["segmentation"]
    assert "curves_segmenter.png" in {p.rsplit("/", 1)[-1] for p in fs.ls("medseg-eval/eval/figures")}
    with fs.open("medseg-eval/eval/per_image.parquet", "rb") as f:
        remote = pq.read_table(f).drop(["seconds", "source", "error"]).to_pylist()
    _, out, _ = local_run
    local = pq.read_table(out / "per_image_no_tta.parquet").drop(["seconds", "source", "error"])
    assert remote == local.to_pylist()


def test_choose_backend_and_training_log(tmp_path) -> None:
    from pipelines.evaluate import choose_backend, find_training_log

    assert choose_backend("auto", 10, 2000) == "local"
    assert choose_backend("auto", 2000, 2000) == "ray"
    assert choose_backend("local", 10**6) == "local"
    assert choose_backend("auto", 10**6, 2000, packed=True) == "local"  # Ray reads no packs
    with pytest.raises(ValueError):
        choose_backend("spark", 1)
    run = make_run(tmp_path)
    image, note = find_training_log(str(run / "segmenter" / "best"))
    assert image.ndim == 3 and "4 epochs" in note and "best val_dice 0.7000 at epoch 3" in note
    assert find_training_log(str(run / "classifier" / "best")) is None
    from medseg_core.io import encode_png

    png = encode_png(np.zeros((5, 6, 3), np.uint8))
    (run / "classifier" / "curves.png").write_bytes(png)
    assert find_training_log(str(run / "classifier" / "best"))[0] == png


# ---------------------------------------------------------------------------------- rows only
def perfect_rows(n_per_class: int = 4, size: int = 48) -> list[dict]:
    """Rows of a perfect predictor: every predicted mask and label equals the truth."""
    rows = []
    for label, kind in enumerate(CLASS_NAMES):
        for i in range(n_per_class):
            _, truth = make_sample(kind, size, np.random.default_rng([label, i]))
            probs = {n: float(n == kind) for n in CLASS_NAMES}
            output = {"mask": truth, "label": label, "label_name": kind, "probabilities": probs,
                      "lesion_area_fraction": float(truth.mean()), "bbox": None}
            rows.append(prediction_row(f"{kind}-{i}", f"mem://{kind}/{i}.png", output,
                                       truth=truth, true_label=label))
    return rows


def test_perfect_predictor_aggregates_are_one_with_zero_width() -> None:
    rows = perfect_rows()
    summary = summarize(rows, CLASS_NAMES, baseline_rows=rows,
                        bootstrap_config=BootstrapConfig(samples=500))
    for group, agg in summary["segmentation"]["groups"].items():
        for m in METRICS:
            for kind in ("global", "mean"):
                assert agg[m][kind] == 1.0, (group, m, kind)
                assert agg[m][f"{kind}_ci"] == [1.0, 1.0], (group, m, kind)
        assert agg["hd95"]["mean"] == 0.0 and agg["hd95"]["mean_ci"] == [0.0, 0.0]
        assert agg["hd95"]["n_inf"] == 0
    cls = summary["classification"]
    assert cls["accuracy"] == {"value": 1.0, "ci": [1.0, 1.0]}
    assert cls["macro_f1"] == {"value": 1.0, "ci": [1.0, 1.0]}
    assert np.array_equal(cls["confusion"], np.diag([4, 4, 4]))
    for scores in cls["per_class"].values():
        for k in ("precision", "recall", "f1"):
            assert scores[k] == {"value": 1.0, "ci": [1.0, 1.0]}
    # the same rows against themselves: no TTA effect, exactly
    assert summary["tta"]["metrics"]["dice"]["delta_mean"] == {"value": 0.0, "ci": [0.0, 0.0]}
    assert summary["tta"]["dice_unchanged"] == len(rows)


def test_bootstrap_ci_contains_the_estimate_and_narrows() -> None:
    rng = np.random.default_rng(0)
    boot = BootstrapConfig(samples=1000, seed=1)
    widths = {}
    for n in (30, 300):
        values = rng.beta(5, 2, size=n)
        ci = mean_ci(values, boot)
        lo, hi = ci["ci"]
        assert lo <= ci["value"] <= hi and ci["value"] == pytest.approx(values.mean())
        truth = rng.random((n, 20, 20)) < 0.3
        pred = truth ^ (rng.random((n, 20, 20)) < 0.1)
        counts = M.confusion_counts(pred, truth)
        g = global_metric_ci(counts, "dice", boot)
        assert g["ci"][0] <= g["value"] <= g["ci"][1]
        assert g["value"] == pytest.approx(M.dice(counts.sum(0)))
        widths[n] = (hi - lo, g["ci"][1] - g["ci"][0])
    assert widths[300][0] < 0.5 * widths[30][0]  # ~ 1/sqrt(10)
    assert widths[300][1] < 0.5 * widths[30][1]
    # seeded: same seed, same interval; another seed, another interval
    values = rng.random(50)
    assert mean_ci(values, boot) == mean_ci(values, boot)
    assert mean_ci(values, boot) != mean_ci(values, BootstrapConfig(samples=1000, seed=2))


def test_bootstrap_weights_are_resamples_and_chunking_invariant() -> None:
    chunks = list(bootstrap_weights(37, 100, seed=3, max_elements=37 * 7))
    assert len(chunks) == 15 and all(c.shape[1] == 37 for c in chunks)
    small = np.concatenate(chunks)
    big = np.concatenate(list(bootstrap_weights(37, 100, seed=3)))
    assert np.array_equal(small, big)
    assert np.all(small.sum(axis=1) == 37) and small.min() >= 0


def test_classification_summary_equals_the_meter() -> None:
    rng = np.random.default_rng(4)
    true = rng.integers(0, 3, 200)
    pred = np.where(rng.random(200) < 0.7, true, rng.integers(0, 3, 200))
    true[:5] = -1  # unknown labels are left out
    s = classification_summary(true, pred, CLASS_NAMES, BootstrapConfig(samples=400))
    meter = M.ClassificationMeter(3)
    meter.update(pred[5:], true[5:])
    assert s["n"] == 195 and np.array_equal(s["confusion"], meter.confusion)
    assert s["accuracy"]["value"] == pytest.approx(meter.accuracy())
    assert s["macro_f1"]["value"] == pytest.approx(meter.macro_f1())
    for i, name in enumerate(CLASS_NAMES):
        pc = s["per_class"][name]
        assert pc["precision"]["value"] == pytest.approx(meter.precision()[i])
        assert pc["recall"]["value"] == pytest.approx(meter.recall()[i])
        assert pc["f1"]["value"] == pytest.approx(meter.f1()[i])
        assert pc["f1"]["ci"][0] <= pc["f1"]["value"] <= pc["f1"]["ci"][1]
        assert pc["support"] == int((true[5:] == i).sum())
    assert s["accuracy"]["ci"][0] < s["accuracy"]["value"] < s["accuracy"]["ci"][1]
    assert classification_summary([-1, 0], [1, -1], CLASS_NAMES) is None
    # a class that never occurs has no scores and does not drag macro-F1 down
    s = classification_summary([0, 0, 1, 1], [0, 0, 1, 0], CLASS_NAMES)
    assert s["per_class"]["malignant"]["f1"]["value"] is None
    f1 = [s["per_class"][c]["f1"]["value"] for c in ("normal", "benign")]
    assert s["macro_f1"]["value"] == pytest.approx(np.mean(f1))


def _row(id: str, pred: np.ndarray, truth: np.ndarray, label: int = 1) -> dict:
    out = {"mask": pred, "label": label, "label_name": CLASS_NAMES[label], "probabilities": {},
           "lesion_area_fraction": float(pred.mean()), "bbox": None}
    return prediction_row(id, f"mem://{id}", out, truth=truth, true_label=label)


def test_select_cases_best_median_worst() -> None:
    truth = np.zeros((10, 10), np.uint8)
    truth[2:8, 2:8] = 1
    rows = []
    for k in range(5):  # dice falls as the prediction shrinks
        pred = np.zeros_like(truth)
        pred[2:8 - k, 2:8] = 1
        rows.append(_row(f"shrink{k}", pred, truth))
    empty = np.zeros_like(truth)
    rows.append(_row("normal-ok", empty, empty, label=0))  # dice 1 too, but no lesion
    rows.append(error_row("broken", "mem://broken", "cannot read"))
    cases = select_cases(rows, CLASS_NAMES)
    picked = {c["which"]: c["id"] for c in cases}
    assert picked == {"best": "shrink0", "worst": "shrink4", "median": "shrink2"}
    assert cases[0]["value"] == 1.0 and cases[0]["true_class"] == "benign"
    per_class = select_cases(rows, CLASS_NAMES, per_class=True)
    assert {c["group"] for c in per_class} == {"all", "normal", "benign"}
    worst_hd = select_cases(rows, CLASS_NAMES, metric="hd95")
    assert {c["which"]: c["id"] for c in worst_hd} == {
        "best": "shrink0", "median": "shrink2", "worst": "shrink4"}
    # rows read back from Parquet carry None for a missing distance: ranked last, no crash
    rows[4] = {**rows[4], "hd95": None}
    assert select_cases(rows, CLASS_NAMES, metric="hd95")[-1]["id"] == "shrink4"
    with pytest.raises(ValueError, match="unknown case metric 'dcie'"):
        select_cases(rows, CLASS_NAMES, metric="dcie")
    assert select_cases(rows, CLASS_NAMES, metric="lesion_area_fraction")
    timed = [{**r, "seconds": float(i)} for i, r in enumerate(rows[:5])]  # shrink4 slowest
    assert {c["which"]: c["id"] for c in select_cases(timed, CLASS_NAMES, metric="seconds")} \
        == {"best": "shrink0", "median": "shrink2", "worst": "shrink4"}
    # the entry point refuses it before reading a bundle or an image (none exist here)
    from pipelines.config import load_config
    from pipelines.evaluate import evaluate

    cfg = load_config(["output_dir=/nonexistent", "data.url=/nonexistent",
                       "evaluate.cases.metric=dcie"], config_name="evaluate")
    with pytest.raises(ValueError, match="unknown case metric 'dcie'"):
        evaluate(cfg)
    with pytest.raises(ValueError, match=r"\['all'\] are reserved"):
        select_cases(rows, ["all", "benign", "malignant"], per_class=True)


def test_table_records_flatten_rows() -> None:
    rows = perfect_rows(1)
    rows.append(error_row("bad", "mem://bad.png", "ImageDecodeError: mem://bad.png: truncated",
                          true_label=2))
    table = table_records(rows, CLASS_NAMES)
    assert [r["id"] for r in table] == sorted(r["id"] for r in rows)
    bad = next(r for r in table if r["id"] == "bad")
    assert bad["dice"] is None and bad["true_class"] == "malignant" and "truncated" in bad["error"]
    good = next(r for r in table if r["id"] == "benign-0")
    assert good["dice"] == 1.0 and good["prob_benign"] == 1.0 and good["pred_class"] == "benign"


class _Stub:
    """A segmenter whose probability is a fixed, asymmetric function of the image."""

    threshold = 0.5
    version = "stub"

    def predict_proba(self, images):
        out = []
        for im in images:
            h, w = im.shape[:2]
            ramp = np.linspace(0, 1, w)[None, :] * np.linspace(1, 0.5, h)[:, None]
            out.append((0.5 * im[..., 0] / 255.0 + 0.5 * ramp).astype(np.float32))
        return out


def test_flip_tta_averages_flipped_predictions() -> None:
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, (9, 13, 3), dtype=np.uint8),
              rng.integers(0, 256, (6, 4, 3), dtype=np.uint8)]
    stub = _Stub()
    tta = FlipTTA(stub)
    for im, got in zip(images, tta.predict_proba(images)):
        plain = stub.predict_proba([im])[0]
        h = stub.predict_proba([im[:, ::-1]])[0][:, ::-1]
        v = stub.predict_proba([im[::-1]])[0][::-1]
        assert np.allclose(got, (plain + h + v) / 3, atol=1e-6)
        assert got.shape == im.shape[:2]
    masks = tta.predict(images, threshold=0.6)
    assert all(m.dtype == np.uint8 and set(np.unique(m)) <= {0, 1} for m in masks)
    assert tta.version == "stub+tta(identity,hflip,vflip)"
    # identity only is the plain segmenter
    plain = [(p > 0.5).astype(np.uint8) for p in stub.predict_proba(images)]
    for a, b in zip(FlipTTA(stub, ["identity"]).predict(images), plain):
        assert np.array_equal(a, b)
    with pytest.raises(ValueError):
        FlipTTA(stub, ["rotate90"])


class _PostprocessedStub(_Stub):
    """A segmenter whose bundle chose the mirror average and the largest component."""

    flip = True
    keep_largest = True

    def predict_proba(self, images):
        assert not self.flip and not self.keep_largest, "TTA must run over the plain maps"
        return super().predict_proba(images)


def test_tta_runs_over_the_plain_maps_and_keeps_the_largest_component_of_their_mean() -> None:
    """Evaluation's TTA wrapped a bundle that flips and keeps the largest component: its hflip
    view repeated the bundle's own mirror average, and the mean of per-view components left
    masks of several components."""
    import torch

    from medseg_core.postprocess import keep_largest

    rng = np.random.default_rng(11)
    images = [rng.integers(0, 256, (17, 23, 3), dtype=np.uint8) for _ in range(3)]
    stub = _PostprocessedStub()
    tta = flip_tta(stub)
    assert stub.flip and stub.keep_largest  # the bundle's own segmenter is left as it was
    plain = _Stub()
    for im, got in zip(images, tta.predict_proba(images)):
        mean = (plain.predict_proba([im])[0] + plain.predict_proba([im[:, ::-1]])[0][:, ::-1]
                + plain.predict_proba([im[::-1]])[0][::-1]) / 3
        keep = keep_largest(torch.from_numpy(mean[None]) > 0.5)[0].numpy()
        assert np.allclose(got, mean * keep, atol=1e-6)
    for mask in tta.predict(images):
        assert np.array_equal(mask, keep_largest(torch.from_numpy(mask[None]) > 0)[0].numpy())
