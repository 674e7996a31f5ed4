"""The HTML report in a real headless browser (Debian's chromium): the page loads, every image
decodes, and every number shown equals summary.json (and the per-image table per_image.csv).

How: one chromium run loads the report from a file:// URL with `--dump-dom` and `--screenshot`.
The page's own script runs on load, checks each <img> (`complete && naturalWidth > 0`) and each
number, and writes what it found as JSON into <pre id="selfcheck">, which comes back in the
dumped DOM. The test compares those numbers with summary.json itself (independently of the page's
own check) and checks the screenshot (a 1280x2000 PNG, not blank). Only the chromium binary and the standard library are needed (no
DevTools-protocol client). Skipped, with the reason, where chromium is not installed.
"""

from __future__ import annotations

import csv
import html
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medseg_core.evaluation import BootstrapConfig, summarize, table_records
from medseg_core.report import lookup, write_report
from medseg_core.results import error_row, prediction_row
from tests.test_evaluate import eval_config, make_run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WINDOW = (1280, 2000)
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install "
                       "chromium; `python3 scripts/dev.py test` installs it)"),
]


def run_chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    assert CHROMIUM is not None
    flags = [
        "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--no-default-browser-check",
        "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={profile}",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        flags.append("--no-sandbox")  # chromium refuses to run as root with its sandbox
    result = subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def render(report: Path, profile: Path) -> tuple[dict, Path]:
    """Load the report in headless chromium once: the page's own check (recorded on load into
    <pre id="selfcheck">, read from the dumped DOM) and a screenshot of the top of the page,
    saved next to the report as report.png."""
    shot = report.with_name("report.png")
    dom = run_chromium([f"--screenshot={shot}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
                        "--dump-dom", report.as_uri()], profile).stdout
    match = re.search(r'<pre id="selfcheck">(.*?)</pre>', dom, re.S)
    assert match, "no <pre id=selfcheck> in the dumped DOM"
    assert match.group(1).strip(), "the page's script did not run"
    assert shot.is_file(), "chromium wrote no screenshot"
    return json.loads(html.unescape(match.group(1))), shot


def assert_not_blank(path: Path) -> None:
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == WINDOW
        a = np.asarray(im.convert("RGB"))
    assert a.std() > 10  # text, tables and figures, not a blank page
    assert len(np.unique(a.reshape(-1, 3), axis=0)) > 50


def check_numbers(check: dict, summary: dict, table: dict[tuple[str, str], str] | None) -> None:
    """Every number on the page equals its source, and is shown rounded correctly."""
    assert check["numbers"], "no numbers found on the page"
    for item in check["numbers"]:
        value, text = item["value"], item["text"]
        if "path" in item:
            expect = lookup(summary, item["path"])
            if expect is None or isinstance(expect, bool):
                assert value is None and text == "–", item
                continue
            assert value == expect, item  # exact: the page carries the full-precision value
        else:
            assert table is not None
            raw = table[(item["row"], item["col"])]
            if raw in (None, "", "nan"):
                assert value is None and text == "–", item
                continue
            assert value == float(raw), item
        decimals = len(text.split(".")[1]) if "." in text else 0
        assert abs(float(text) - value) <= 0.5 * 10**-decimals + 1e-9, item


@pytest.fixture(scope="module")
def job_report(tmp_path_factory, synthetic_archive) -> Path:
    """A report written by the evaluate job (in-process, TTA on) on the synthetic archive."""
    from pipelines.evaluate import evaluate

    root = tmp_path_factory.mktemp("browser")
    make_run(root)
    cfg = eval_config(root, synthetic_archive, "evaluate.split=all", "evaluate.tta.enabled=true",
                      "evaluate.hausdorff=true", f"evaluate.out={root / 'eval'}")
    evaluate(cfg)
    return root / "eval" / "report.html"


def test_job_report_renders_and_matches_summary(job_report: Path, tmp_path: Path) -> None:
    check, shot = render(job_report, tmp_path / "profile")
    page = job_report.read_text()
    # the page loads, and every image in it decodes
    n_img = page.count("<img ")
    assert n_img == 3  # cases montage, confusion matrix, segmenter training curves
    assert len(check["images"]) == n_img and check["broken"] == 0
    assert all(i["complete"] and i["width"] > 0 and i["height"] > 0 for i in check["images"])
    # the numbers shown equal summary.json (and the per-image table per_image.csv)
    summary = json.loads((job_report.parent / "summary.json").read_text())
    with open(job_report.parent / "per_image.csv") as f:
        table = {(r["id"], col): r[col] for r in csv.DictReader(f) for col in r}
    check_numbers(check, summary, table)
    assert check["mismatches"] == [] and check["ok"] is True
    shown = {tuple(i["path"]) for i in check["numbers"] if "path" in i}
    for key in (("segmentation", "groups", "all", "dice", "global"),
                ("segmentation", "groups", "all", "dice", "mean_ci", 0),
                ("classification", "macro_f1", "value"), ("tta", "metrics", "dice",
                                                          "delta_mean", "value")):
        assert key in shown, key
    # and it looks like something: the screenshot is a real, non-blank PNG
    assert_not_blank(shot)


def test_report_edge_cases_render(tmp_path: Path) -> None:
    """No classifier, no Hausdorff, failed images and an empty class: still a valid page."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        truth = (rng.random((24, 24)) < 0.3).astype(np.uint8)
        pred = truth if i % 2 else np.zeros_like(truth)
        out = {"mask": pred, "label": -1, "label_name": None, "probabilities": {},
               "lesion_area_fraction": float(pred.mean()), "bbox": None}
        rows.append(prediction_row(f"img{i}", f"mem://img{i}.png", out, truth=truth,
                                   true_label=-1, hausdorff=False))
    # an id that would end the embedded JSON's script element, or swallow the page's script
    rows.append(error_row("broken<1><!--<script></script>", "mem://broken.png",
                          "ImageDecodeError: truncated <&>"))
    summary = summarize(rows, ["lesion"], bootstrap_config=BootstrapConfig(samples=200))
    summary["run"] = {"dataset": "hand-made", "split": "all", "backend": "none", "tta": None}
    image = (rng.random((40, 60, 3)) * 255).astype(np.uint8)
    written = write_report(str(tmp_path / "out"), summary, {"cases": image},
                           table_records(rows, ["lesion"]), title="edge <cases>")
    report = Path(written["report"])
    check, shot = render(report, tmp_path / "profile")
    assert_not_blank(shot)
    assert check["ok"] and check["broken"] == 0 and len(check["images"]) == 1
    check_numbers(check, json.loads(Path(written["summary"]).read_text()),
                  {(r["id"], c): r[c] for r in table_records(rows, ["lesion"]) for c in r})
    page = report.read_text()
    assert "broken&lt;1&gt;&lt;!--" in page and "edge &lt;cases&gt;" in page  # escaped, not markup
    assert summary["classification"] is None
    assert all(not math.isnan(i["value"]) for i in check["numbers"] if i["value"] is not None)
