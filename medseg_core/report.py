"""The evaluation report: one self-contained HTML page (figures embedded as base64 PNG data URIs,
inline CSS and script, no external resource; a Content-Security-Policy forbids loading any) and
the `summary.json` it shows.

Every number taken from the summary is rendered as ``<span class="num" data-path='["a","b"]'
data-value="0.8123" data-decimals="3">0.812</span>``: ``data-path`` is its location in
summary.json, ``data-value`` the full-precision value. Numbers of the per-image table carry
``data-row`` (image id) and ``data-col`` (column of per_image.csv) instead. On load, the page's own
script checks that every image decoded and that every number equals the summary embedded in the
page (and its rounding the value), and writes the result as JSON into ``<pre id="selfcheck">``
(shown as a one-line status at the bottom), so a headless browser can verify the rendered page
(`tests/test_report_browser.py`).
"""

from __future__ import annotations

import base64
import html
import json
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import fsspec
import numpy as np

from medseg_core.io import encode_png
from medseg_core.viz import confusion_overlay, montage

__all__ = [
    "FIGURE_TITLES",
    "png_data_uri",
    "case_montage",
    "render_html",
    "write_report",
    "lookup",
]

FIGURE_TITLES = {
    "cases": "Best, median and worst cases",
    "confusion_matrix": "Confusion matrix",
    "curves_segmenter": "Training curves: segmenter",
    "curves_classifier": "Training curves: classifier",
}
_METRIC_LABELS = {
    "dice": "Dice",
    "iou": "IoU (Jaccard)",
    "thresholded_jaccard": "Thresholded Jaccard (0.65)",
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "precision": "Precision",
    "recall": "Recall",
    "hd95": "Hausdorff 95 (px)",
}
_TABLE_COLS = ("dice", "iou", "thresholded_jaccard", "sensitivity", "specificity", "precision",
               "recall", "hd95")
_CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
        "script-src 'unsafe-inline'; base-uri 'none'; form-action 'none'")


# ----------------------------------------------------------------------------------- pictures
def png_data_uri(image: np.ndarray | bytes) -> str:
    """``data:image/png;base64,...`` of PNG bytes or of a uint8 image array."""
    data = image if isinstance(image, (bytes, bytearray)) else encode_png(np.asarray(image))
    if not bytes(data[:8]) == b"\x89PNG\r\n\x1a\n":
        raise ValueError("png_data_uri needs PNG bytes or a uint8 image array")
    return "data:image/png;base64," + base64.b64encode(bytes(data)).decode("ascii")


def case_montage(cases: Sequence[Mapping[str, Any]], cell: int = 176,
                 background: tuple[int, int, int] = (72, 76, 84)) -> np.ndarray:
    """One row per case: image, truth, prediction, and the TP/FP/FN overlay (TP cyan, FP
    magenta, FN yellow over the image), labelled, on a dark ``background`` (so that white masks
    keep their edges). Each case needs ``image`` (uint8 HxW[xC]),
    ``truth`` and ``pred`` (HxW {0,1}); ``which``, ``value``, ``true_class`` and ``pred_class``
    go into the labels."""
    if not cases:
        raise ValueError("case_montage needs at least one case")
    tiles: list[np.ndarray] = []
    labels: list[str] = []
    for c in cases:
        image, truth, pred = np.asarray(c["image"]), np.asarray(c["truth"]), np.asarray(c["pred"])
        value = c.get("value")
        score = "n/a" if value is None else f"{float(value):.3f}"
        group = c.get("group", "all")
        which = str(c.get("which", ""))
        head = which if group in (None, "all") else f"{which} {group}"
        tiles += [image, truth.astype(np.uint8), pred.astype(np.uint8),
                  confusion_overlay(pred, truth, image=image)]
        labels += [f"{head}: {c.get('metric', 'dice')} {score}",
                   f"truth: {c.get('true_class') or '-'}",
                   f"pred: {c.get('pred_class') or '-'}",
                   "TP cyan FP magenta FN yellow"]
    return montage(tiles, ncols=4, labels=labels, cell=cell, background=background)


# ----------------------------------------------------------------------------------- numbers
def lookup(summary: Mapping[str, Any], path: Sequence[Any]) -> Any:
    """The value at a data-path (keys and list indices) in the summary."""
    node: Any = summary
    for key in path:
        node = node[int(key)] if isinstance(node, list) else node[key]
    return node


class _Numbers:
    """Formats summary values as tagged spans (and remembers nothing: the DOM is the record)."""

    def __init__(self, summary: Mapping[str, Any]):
        self.summary = summary

    def __call__(self, path: Sequence[Any], decimals: int = 3, suffix: str = "") -> str:
        try:
            value = lookup(self.summary, path)
        except (KeyError, IndexError, TypeError):
            value = None
        return _span(value, decimals, {"data-path": json.dumps(list(path))}, suffix)

    def ci(self, path: Sequence[Any], decimals: int = 3) -> str:
        lo = self(list(path) + [0], decimals)
        hi = self(list(path) + [1], decimals)
        return f'<span class="ci">[{lo}, {hi}]</span>'


def _span(value: Any, decimals: int, attrs: Mapping[str, str], suffix: str = "") -> str:
    if isinstance(value, bool) or value is None or (isinstance(value, float) and not math.isfinite(value)):
        text, raw = "–", "null"
    elif isinstance(value, (int, float, np.integer, np.floating)):
        v = float(value)
        if isinstance(value, (int, np.integer)):
            decimals = 0
        text, raw = f"{v:.{decimals}f}", repr(v)
    else:
        text, raw = str(value), json.dumps(value)
        decimals = -1
    attr = "".join(f' {k}="{html.escape(str(v), quote=True)}"' for k, v in attrs.items())
    return (f'<span class="num"{attr} data-value="{html.escape(raw, quote=True)}" '
            f'data-decimals="{decimals}">{html.escape(text)}</span>{html.escape(suffix)}')


def _e(text: Any) -> str:
    return html.escape("" if text is None else str(text))


# ----------------------------------------------------------------------------------- sections
def _header(summary: Mapping[str, Any], num: _Numbers, title: str) -> str:
    run = summary.get("run") or {}
    meta = []
    for key, label in (("dataset", "dataset"), ("archive", "archive"), ("split", "split"),
                       ("backend", "backend"), ("created", "created")):
        if run.get(key) is not None:
            meta.append(f"<dt>{label}</dt><dd>{_e(run[key])}</dd>")
    for key in ("segmenter", "classifier"):
        b = (run.get("bundles") or {}).get(key)
        if b:
            meta.append(f"<dt>{key}</dt><dd><code>{_e(b.get('uri'))}</code> "
                        f"version <code>{_e(b.get('version'))}</code></dd>")
    tta = run.get("tta")
    meta.append("<dt>test-time augmentation</dt><dd>"
                + (f"on: mean of {_e(', '.join(tta))}" if tta else "off") + "</dd>")
    meta.append(f"<dt>images</dt><dd>{num(['n_images'])} listed, {num(['n_evaluated'])} "
                f"evaluated, {num(['n_errors'])} failed</dd>")
    if run.get("seconds") is not None:
        meta.append(f"<dt>time</dt><dd>{num(['run', 'seconds'], 1)} s</dd>")
    return (f"<header><h1>{_e(title)}</h1><dl class='meta'>{''.join(meta)}</dl></header>")


def _cards(summary: Mapping[str, Any], num: _Numbers) -> str:
    groups = (summary.get("segmentation") or {}).get("groups") or {}
    cards = []
    if "all" in groups and groups["all"].get("n"):
        base = ["segmentation", "groups", "all"]
        cards.append(("Dice (global)", num(base + ["dice", "global"]),
                      num.ci(base + ["dice", "global_ci"])))
        cards.append(("Dice (mean per image)", num(base + ["dice", "mean"]),
                      num.ci(base + ["dice", "mean_ci"])))
        cards.append(("IoU (mean per image)", num(base + ["iou", "mean"]),
                      num.ci(base + ["iou", "mean_ci"])))
        if "hd95" in groups["all"]:
            cards.append(("Hausdorff 95 (mean, px)", num(base + ["hd95", "mean"], 2),
                          num.ci(base + ["hd95", "mean_ci"], 2)))
    if summary.get("classification"):
        cards.append(("Accuracy", num(["classification", "accuracy", "value"]),
                      num.ci(["classification", "accuracy", "ci"])))
        cards.append(("Macro-F1", num(["classification", "macro_f1", "value"]),
                      num.ci(["classification", "macro_f1", "ci"])))
    if not cards:
        return ""
    body = "".join(f"<div class='card'><div class='label'>{_e(t)}</div>"
                   f"<div class='big'>{v}</div><div>{ci}</div></div>" for t, v, ci in cards)
    conf = (summary.get("bootstrap") or {}).get("confidence", 0.95)
    return (f"<section id='headline'><div class='cards'>{body}</div><p class='note'>"
            f"Brackets: {100 * float(conf):.0f}% percentile bootstrap intervals "
            f"({_e((summary.get('bootstrap') or {}).get('samples'))} resamples of the images, "
            f"seed {_e((summary.get('bootstrap') or {}).get('seed'))}).</p></section>")


def _segmentation(summary: Mapping[str, Any], num: _Numbers) -> str:
    seg = summary.get("segmentation") or {}
    groups = seg.get("groups") or {}
    names = [g for g, v in groups.items() if v.get("n")]
    if not names:
        return "<section id='segmentation'><h2>Segmentation</h2><p>No image was evaluated.</p></section>"
    head = "".join(f"<th>{_e(g)}<br><small>n = {num(['segmentation', 'groups', g, 'n'])}</small></th>"
                   for g in names)
    parts = ["<section id='segmentation'><h2>Segmentation</h2>",
             "<p class='note'>Groups are the images' true classes. <b>Global</b>: the metric of "
             "the confusion counts summed over all images of the group (as nnU-Net reports); "
             "<b>mean</b>: the average of the per-image values (the ISIC 2018 score is the mean "
             "thresholded Jaccard). Empty truth and empty prediction count as a perfect 1.</p>"]
    for kind, title in (("mean", "Mean per image"), ("global", "Global (pooled counts)")):
        rows = []
        for m in seg.get("metrics") or []:
            if m == "hd95":
                if kind != "mean":
                    continue
                cells = "".join(
                    f"<td>{num(['segmentation', 'groups', g, 'hd95', 'mean'], 2)} "
                    f"{num.ci(['segmentation', 'groups', g, 'hd95', 'mean_ci'], 2)}"
                    f"<br><small>median {num(['segmentation', 'groups', g, 'hd95', 'median'], 2)}"
                    f", one mask empty: {num(['segmentation', 'groups', g, 'hd95', 'n_inf'])}"
                    f"</small></td>" for g in names)
            else:
                cells = "".join(
                    f"<td>{num(['segmentation', 'groups', g, m, kind])} "
                    f"{num.ci(['segmentation', 'groups', g, m, kind + '_ci'])}</td>" for g in names)
            rows.append(f"<tr><th>{_e(_METRIC_LABELS.get(m, m))}</th>{cells}</tr>")
        parts.append(f"<h3>{title}</h3><table class='metrics' id='seg-{kind}'><thead><tr>"
                     f"<th>metric</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>")
    parts.append("</section>")
    return "".join(parts)


def _tta(summary: Mapping[str, Any], num: _Numbers) -> str:
    tta = summary.get("tta")
    if not tta or not tta.get("metrics"):
        return ""
    flips = ", ".join((summary.get("run") or {}).get("tta") or [])
    rows = []
    for m in tta["metrics"]:
        b = ["tta", "metrics", m]
        rows.append(
            f"<tr><th>{_e(_METRIC_LABELS.get(m, m))}</th>"
            f"<td>{num(b + ['without_mean'])}</td><td>{num(b + ['with_mean'])}</td>"
            f"<td>{num(b + ['delta_mean', 'value'])} {num.ci(b + ['delta_mean', 'ci'])}</td>"
            f"<td>{num(b + ['without_global'])}</td><td>{num(b + ['with_global'])}</td>"
            f"<td>{num(b + ['delta_global', 'value'])} {num.ci(b + ['delta_global', 'ci'])}</td></tr>")
    acc = ""
    if tta.get("accuracy"):
        acc = (f"<p>Classifier accuracy on the predicted masks: without "
               f"{num(['tta', 'accuracy', 'without'])}, with {num(['tta', 'accuracy', 'with'])}.</p>")
    return (
        "<section id='tta'><h2>Effect of test-time augmentation</h2>"
        f"<p class='note'>The same {num(['tta', 'n'])} images predicted without and with TTA "
        f"(foreground probabilities averaged over {_e(flips or 'flips')}). Differences are "
        "with - without, with paired bootstrap intervals (the same resamples for both). Dice "
        f"improved on {num(['tta', 'dice_improved'])}, worsened on "
        f"{num(['tta', 'dice_worsened'])}, unchanged on {num(['tta', 'dice_unchanged'])} images. "
        "Everything else in this report is with TTA.</p>"
        "<table class='metrics' id='tta-table'><thead><tr><th>metric</th><th>mean without</th>"
        "<th>mean with</th><th>difference of means</th><th>global without</th>"
        "<th>global with</th><th>difference (global)</th></tr></thead><tbody>"
        f"{''.join(rows)}</tbody></table>{acc}</section>")


def _classification(summary: Mapping[str, Any], num: _Numbers, figures: Mapping[str, str]) -> str:
    cls = summary.get("classification")
    pred = summary.get("predicted_classes") or {}
    if not cls:
        if not pred or set(pred) == {"none"}:
            return ""
        items = "".join(f"<li>{_e(k)}: {num(['predicted_classes', k])}</li>" for k in pred)
        return (f"<section id='classification'><h2>Classification</h2><p>No true labels: "
                f"predicted classes only.</p><ul>{items}</ul></section>")
    rows = []
    for name in cls["class_names"]:
        b = ["classification", "per_class", name]
        rows.append(
            f"<tr><th>{_e(name)}</th>"
            f"<td>{num(b + ['precision', 'value'])} {num.ci(b + ['precision', 'ci'])}</td>"
            f"<td>{num(b + ['recall', 'value'])} {num.ci(b + ['recall', 'ci'])}</td>"
            f"<td>{num(b + ['f1', 'value'])} {num.ci(b + ['f1', 'ci'])}</td>"
            f"<td>{num(b + ['support'])}</td><td>{num(b + ['predicted'])}</td></tr>")
    fig = _figure("confusion_matrix", figures)
    return (
        "<section id='classification'><h2>Classification (through the chain)</h2>"
        f"<p>On {num(['classification', 'n'])} labelled images, classifying the lesion of the "
        f"predicted mask: accuracy {num(['classification', 'accuracy', 'value'])} "
        f"{num.ci(['classification', 'accuracy', 'ci'])}, macro-F1 "
        f"{num(['classification', 'macro_f1', 'value'])} "
        f"{num.ci(['classification', 'macro_f1', 'ci'])}.</p>"
        "<div class='row'><table class='metrics' id='cls-table'><thead><tr><th>class</th>"
        "<th>precision</th><th>recall</th><th>F1</th><th>true</th><th>predicted</th></tr>"
        f"</thead><tbody>{''.join(rows)}</tbody></table>{fig}</div></section>")


def _figure(name: str, figures: Mapping[str, str], caption: str = "") -> str:
    if name not in figures:
        return ""
    title = FIGURE_TITLES.get(name, name)
    return (f"<figure id='fig-{_e(name)}'><img id='img-{_e(name)}' alt='{_e(title)}' "
            f"src='{figures[name]}'><figcaption>{_e(caption or title)}</figcaption></figure>")


def _cases(summary: Mapping[str, Any], num: _Numbers, figures: Mapping[str, str]) -> str:
    cases = summary.get("cases") or []
    if not cases:
        return ""
    rows = "".join(
        f"<tr><td>{_e(c['which'])}</td><td>{_e(c['group'])}</td><td><code>{_e(c['id'])}</code></td>"
        f"<td>{num(['cases', i, 'value'])}</td><td>{_e(c.get('true_class') or '-')}</td>"
        f"<td>{_e(c.get('pred_class') or '-')}</td></tr>" for i, c in enumerate(cases))
    metric = _e(cases[0].get("metric", "dice"))
    legend = ("<p class='legend'><span class='sw' style='background:#0ff'></span>TP "
              "<span class='sw' style='background:#f0f'></span>FP "
              "<span class='sw' style='background:#ff0'></span>FN "
              "(TN: the image)</p>")
    return (
        "<section id='cases'><h2>Best, median and worst cases</h2>"
        f"<p class='note'>Ranked by per-image {metric}; columns: image, ground truth, prediction, "
        "and where they agree and differ.</p>"
        f"{legend}{_figure('cases', figures)}"
        f"<table class='metrics' id='cases-table'><thead><tr><th>case</th><th>group</th><th>id</th>"
        f"<th>{metric}</th><th>true class</th><th>predicted class</th></tr></thead>"
        f"<tbody>{rows}</tbody></table></section>")


def _curves(figures: Mapping[str, str], notes: Mapping[str, str]) -> str:
    items = [_figure(n, figures, notes.get(n, "")) for n in ("curves_segmenter", "curves_classifier")]
    items = [i for i in items if i]
    if not items:
        return ("<section id='curves'><h2>Training curves</h2><p class='note'>No training log "
                "(metrics.csv / curves.png) was found next to the bundles.</p></section>")
    return f"<section id='curves'><h2>Training curves</h2><div class='row'>{''.join(items)}</div></section>"


def _errors(summary: Mapping[str, Any]) -> str:
    errs = summary.get("errors") or []
    if not errs:
        return ""
    rows = "".join(f"<tr><td><code>{_e(e.get('id'))}</code></td><td><code>{_e(e.get('source'))}"
                   f"</code></td><td>{_e(e.get('error'))}</td></tr>" for e in errs)
    return ("<section id='errors'><h2>Images that failed</h2><table class='metrics'><thead><tr>"
            f"<th>id</th><th>source</th><th>error</th></tr></thead><tbody>{rows}</tbody></table>"
            "</section>")


def _table(table: Sequence[Mapping[str, Any]], max_rows: int) -> str:
    if not table:
        return ""
    rows = sorted(table, key=lambda r: (r.get("dice") is None,
                                        -1.0 if r.get("dice") is None else r["dice"], r["id"]))
    shown = rows[:max_rows]
    body = []
    for r in shown:
        cells = []
        for col in _TABLE_COLS:
            v = r.get(col)
            if col == "hd95" and v is not None and math.isinf(v):
                cells.append("<td>∞</td>")
                continue
            cells.append("<td>" + _span(v, 2 if col == "hd95" else 3,
                                        {"data-row": r["id"], "data-col": col}) + "</td>")
        body.append(f"<tr><td><code>{_e(r['id'])}</code></td><td>{_e(r.get('true_class') or '-')}"
                    f"</td><td>{_e(r.get('pred_class') or '-')}</td>{''.join(cells)}</tr>")
    head = "".join(f"<th>{_e(_METRIC_LABELS.get(c, c))}</th>" for c in _TABLE_COLS)
    more = (f" The {len(shown)} lowest-Dice of {len(rows)} images are shown; all are in "
            "per_image.csv / per_image.parquet." if len(rows) > len(shown) else
            " Also in per_image.csv / per_image.parquet.")
    return (f"<section id='per-image'><h2>Per image</h2><p class='note'>Sorted by Dice, worst "
            f"first.{more}</p><table class='metrics small' id='per-image-table'><thead><tr>"
            f"<th>id</th><th>true</th><th>predicted</th>{head}</tr></thead><tbody>"
            f"{''.join(body)}</tbody></table></section>")


_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;
max-width:1240px;padding:16px 24px;color:#1d2430;background:#fff;font-size:14px}
h1{font-size:24px;margin:4px 0 8px}h2{font-size:19px;margin:28px 0 8px;border-bottom:1px solid #d8dde6;
padding-bottom:4px}h3{font-size:15px;margin:14px 0 6px}
dl.meta{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;margin:0}
dl.meta dt{color:#5a6473}dl.meta dd{margin:0}code{font-size:12px;word-break:break-all}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin-top:14px}
.card{border:1px solid #d8dde6;border-radius:8px;padding:8px 14px;min-width:150px;background:#f7f9fc}
.card .label{color:#5a6473;font-size:12px}.card .big{font-size:22px;font-weight:600}
.ci{color:#5a6473;font-size:12px}.note{color:#5a6473;font-size:12px;max-width:980px}
table.metrics{border-collapse:collapse;margin:6px 0 10px}
table.metrics th,table.metrics td{border:1px solid #e1e5ec;padding:3px 8px;text-align:right;
vertical-align:top}table.metrics th:first-child{text-align:left}
table.metrics thead th{background:#f0f3f8;text-align:center}
table.small{font-size:12px}table.small td:nth-child(-n+3){text-align:left}
figure{margin:8px 16px 8px 0}figure img{max-width:100%;border:1px solid #e1e5ec}
figcaption{color:#5a6473;font-size:12px}.row{display:flex;flex-wrap:wrap;align-items:flex-start;gap:16px}
.legend .sw{display:inline-block;width:12px;height:12px;margin:0 4px 0 10px;border:1px solid #888;
vertical-align:middle}
footer{margin-top:30px;color:#5a6473;font-size:12px;border-top:1px solid #d8dde6;padding-top:6px}
#selfcheck{display:none}
"""

# Runs on load: records whether every image decoded and every number equals the embedded summary
# (and is shown rounded correctly), into <pre id="selfcheck"> as JSON.
_SCRIPT = r"""
(function () {
  function at(obj, path) {
    var node = obj;
    for (var i = 0; i < path.length; i++) {
      if (node === null || node === undefined) return undefined;
      node = node[path[i]];
    }
    return node;
  }
  function check() {
    var summary = JSON.parse(document.getElementById("summary-data").textContent);
    var images = Array.prototype.map.call(document.images, function (im) {
      return {id: im.id, complete: im.complete, width: im.naturalWidth, height: im.naturalHeight};
    });
    var numbers = [], mismatches = [];
    document.querySelectorAll("span.num").forEach(function (el) {
      var raw = el.getAttribute("data-value");
      var value = raw === "null" ? null : JSON.parse(raw);
      var dec = parseInt(el.getAttribute("data-decimals"), 10);
      var text = el.textContent;
      var item = {value: value, text: text};
      if (el.hasAttribute("data-path")) {
        item.path = JSON.parse(el.getAttribute("data-path"));
        var expect = at(summary, item.path);
        if (expect === undefined) expect = null;
        if (expect !== value && !(typeof expect === "number" && typeof value === "number" &&
            Math.abs(expect - value) <= 1e-12 * Math.max(1, Math.abs(expect)))) {
          mismatches.push({path: item.path, shown: value, summary: expect});
        }
      } else {
        item.row = el.getAttribute("data-row");
        item.col = el.getAttribute("data-col");
      }
      if (value === null) {
        if (text !== "\u2013") mismatches.push({text: text, value: value});
      } else if (typeof value === "number" && dec >= 0) {
        if (Math.abs(parseFloat(text) - value) > 0.5 * Math.pow(10, -dec) + 1e-9) {
          mismatches.push({text: text, value: value, decimals: dec});
        }
      }
      numbers.push(item);
    });
    var broken = images.filter(function (i) { return !(i.complete && i.width > 0); });
    var result = {ok: broken.length === 0 && mismatches.length === 0, images: images,
                  broken: broken.length, numbers: numbers, mismatches: mismatches};
    document.getElementById("selfcheck").textContent = JSON.stringify(result);
    document.getElementById("status").textContent = "Self-check: " + images.length +
      " images, " + (images.length - broken.length) + " decoded; " + numbers.length +
      " numbers, " + mismatches.length + " mismatches" + (result.ok ? " (ok)" : " (FAILED)");
    document.body.setAttribute("data-selfcheck", result.ok ? "ok" : "failed");
  }
  if (document.readyState === "complete") check();
  else window.addEventListener("load", check);
})();
"""


def render_html(summary: Mapping[str, Any], figures: Mapping[str, np.ndarray | bytes] | None = None,
                table: Sequence[Mapping[str, Any]] | None = None, *,
                title: str = "medseg evaluation report", max_rows: int = 300,
                figure_notes: Mapping[str, str] | None = None) -> str:
    """The report as one HTML string.

    ``summary``: the JSON-ready summary (`medseg_core.evaluation.summarize`, plus an optional
    ``run`` block with dataset, split, bundles, ...); ``figures``: name -> PNG bytes or uint8
    array (names of `FIGURE_TITLES`); ``table``: per-image records
    (`medseg_core.evaluation.table_records`), the ``max_rows`` lowest-Dice shown.
    """
    summary = json.loads(json.dumps(summary, allow_nan=False))  # strict JSON, as summary.json
    uris = {k: png_data_uri(v) for k, v in (figures or {}).items()}
    num = _Numbers(summary)
    created = (summary.get("run") or {}).get("created") or time.strftime("%Y-%m-%d %H:%M UTC",
                                                                          time.gmtime())
    # every "<" escaped (still JSON): "</script>" and "<!--" in an image id end or swallow the
    # script element otherwise
    embedded = json.dumps(summary, allow_nan=False).replace("<", "\\u003c")
    body = "".join([
        _header(summary, num, title),
        _cards(summary, num),
        _segmentation(summary, num),
        _tta(summary, num),
        _classification(summary, num, uris),
        _cases(summary, num, uris),
        _curves(uris, figure_notes or {}),
        _errors(summary),
        _table(table or [], max_rows),
    ])
    return (
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<meta http-equiv='Content-Security-Policy' content=\"{_CSP}\">"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>{body}"
        f"<footer>Generated by medseg ({_e(created)}). <span id='status'>Self-check did not run "
        "(JavaScript off).</span></footer>"
        "<pre id='selfcheck'></pre>"
        f"<script type='application/json' id='summary-data'>{embedded}</script>"
        f"<script>{_SCRIPT}</script></body></html>\n")


def write_report(out_url: str, summary: Mapping[str, Any],
                 figures: Mapping[str, np.ndarray | bytes] | None = None,
                 table: Sequence[Mapping[str, Any]] | None = None, *,
                 title: str = "medseg evaluation report", max_rows: int = 300,
                 figure_notes: Mapping[str, str] | None = None,
                 storage_options: dict | None = None) -> dict[str, str]:
    """Write ``report.html``, ``summary.json`` and ``figures/<name>.png`` under ``out_url``
    (any path or fsspec URL); returns name -> URL."""
    figures = dict(figures or {})
    pngs = {k: v if isinstance(v, (bytes, bytearray)) else encode_png(np.asarray(v))
            for k, v in figures.items()}
    page = render_html(summary, pngs, table, title=title, max_rows=max_rows,
                       figure_notes=figure_notes)
    fs, root = fsspec.core.url_to_fs(out_url, **(storage_options or {}))
    root = root.rstrip("/")
    base = out_url.rstrip("/")
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    if "file" in protocols or "local" in protocols:
        fs.makedirs(f"{root}/figures", exist_ok=True)
    written = {}
    for name, data in pngs.items():
        fs.pipe_file(f"{root}/figures/{name}.png", bytes(data))
        written[name] = f"{base}/figures/{name}.png"
    fs.pipe_file(f"{root}/summary.json",
                 json.dumps(summary, indent=1, allow_nan=False).encode("utf-8"))
    written["summary"] = f"{base}/summary.json"
    fs.pipe_file(f"{root}/report.html", page.encode("utf-8"))
    written["report"] = f"{base}/report.html"
    return written
