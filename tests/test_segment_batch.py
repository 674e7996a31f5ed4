"""The nightly bulk segmentation job (pipelines/segment_batch.py): exact outputs on a real S3
server, exactly-once under limits, kills, reruns and injected damage, safe output names."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
from PIL import Image

from medseg_core.io import encode_mask_png, encode_png
from medseg_core.layouts import Listing, Record, list_records
from medseg_core.metrics import confusion_counts, metrics_from_counts
from tests.test_predict import (
    CLASS_NAMES,
    add_corrupt_files,
    assert_matches,
    decode_png_mask,
    make_busi_archive,
    reference,
    sample_image,
    save_bundles,
)

ROOT = Path(__file__).resolve().parents[1]
RESULT_DIRS = ("results", "masks")


def job_config(overrides: list[str]) -> dict:
    from pipelines.config import load_config

    return load_config(overrides, config_name="segment_batch")


def run_job(overrides: list[str], release=None) -> dict:
    from pipelines.segment_batch import run

    return run(job_config(overrides), release=release)


def read_results(url: str, filesystem=None) -> list[dict]:
    """Every committed row, as any Parquet reader sees the dataset (Hive partitions)."""
    path = url.removeprefix("s3://")
    if filesystem is None and not Path(path).exists():
        return []
    ds = pads.dataset(path, filesystem=filesystem, format="parquet", partitioning="hive")
    return ds.to_table().to_pylist()


def local_files(out: Path, sub: str) -> set[str]:
    base = out / sub
    return {p.relative_to(out).as_posix() for p in base.rglob("*") if p.is_file()} \
        if base.exists() else set()


def canonical(rows: list[dict]) -> str:
    """Rows in a comparable form (NaN equal to NaN, order by id)."""
    return json.dumps(sorted(rows, key=lambda r: r["id"]), sort_keys=True, default=str)


def check_exactly_once(out: Path, expected_ids: set[str] | None = None) -> list[dict]:
    """Each id in one row; every result row has its mask; no mask, temp file or part extra."""
    rows = read_results(str(out / "results"))
    ids = Counter(r["id"] for r in rows)
    assert not [i for i, n in ids.items() if n > 1], "duplicate rows"
    if expected_ids is not None:
        assert set(ids) == expected_ids
    masks = local_files(out, "masks")
    referenced = {r["mask_path"] for r in rows if r["error"] is None}
    assert None not in referenced
    assert masks == referenced  # every mask present, none extra
    for r in rows:
        assert (r["error"] is None) == (r["predicted_class"] != "error")
        if r["error"] is None:
            assert r["mask_path"] == f"masks/{r['predicted_class']}/{r['safe_id']}.png"
    assert not [p for p in (out / "results").rglob(".*")]  # no temporary files left
    return rows


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return save_bundles(str(tmp_path_factory.mktemp("bundles")))


# ----------------------------------------------------------------------------------------------
# Names


def test_safe_ids_are_plain_unique_names():
    from pipelines.segment_batch import class_dir, part_name, safe_id

    ids = ["benign/benign (1)", "benign_benign (1)", "../../evil", "/etc/passwd", "..", ".",
           "a/../../../b", "ünïcode 名前 (3)", "名前", "-rf --no-preserve-root", "x" * 500,
           "back\\slash", "nul\x00byte", "%2e%2e%2fx", ""]
    safe = [safe_id(i) for i in ids]
    assert len(set(safe)) == len(ids)  # unique even where slugs collide
    for s in safe:
        assert "/" not in s and "\\" not in s and not s.startswith((".", "-"))
        assert s not in (".", "..") and len(s) <= 100
        assert all(c.isascii() and (c.isalnum() or c in "._-") for c in s)
    assert safe_id("benign/benign (1)").startswith("benign_benign_1-")
    assert safe_id("benign/benign (1)") == safe_id("benign/benign (1)")  # deterministic
    assert class_dir("benign") == "benign"
    assert class_dir(None) == "unclassified" and class_dir("benign", "boom") == "error"
    assert "/" not in class_dir("../../x") and not class_dir("../../x").startswith(".")
    assert class_dir("error") != "error"  # a class literally named "error" stays apart
    assert part_name(["b", "a"]) == part_name(["a", "b"]) != part_name(["a"])


def test_part_names_cannot_collide_through_a_separator_in_an_id():
    from pipelines.segment_batch import part_name

    # ids are file names: a newline in one must not make it the name of two other ids' part
    assert part_name(["x\ny"]) != part_name(["x", "y"])
    assert part_name(['a", "b']) != part_name(["a", "b"])
    assert part_name(["not utf-8 \udcff"]).startswith("part-")


def test_the_reader_refuses_special_and_oversized_files_before_reading_them(tmp_path):
    from medseg_core.io import ImageDecodeError, ImageTooLargeError
    from pipelines.predict import _Reader

    fifo = tmp_path / "stuck.png"
    os.mkfifo(fifo)  # opening it to read would block until a writer came
    (tmp_path / "big.png").write_bytes(b"\x89PNG" + bytes(2000))
    (tmp_path / "ok.png").write_bytes(b"\x89PNG" + bytes(996))
    reader = _Reader(None, None, max_bytes=1000)
    with pytest.raises(ImageDecodeError, match="stuck.png: not a regular file"):
        reader.read(str(fifo))
    with pytest.raises(ImageTooLargeError, match="big.png: 2004 bytes, more than max_bytes"):
        reader.read(str(tmp_path / "big.png"))
    assert reader.read(str(tmp_path / "ok.png")) == b"\x89PNG" + bytes(996)
    assert len(_Reader(None, None, max_bytes=None).read(str(tmp_path / "big.png"))) == 2004


@pytest.mark.s3
def test_the_reader_reads_at_most_max_bytes_from_object_storage(s3):
    import fsspec

    from medseg_core.io import ImageTooLargeError
    from pipelines.predict import _Reader

    s3.create_bucket("medseg-limit")
    fs = fsspec.filesystem("s3", **s3.storage_options)
    fs.pipe_file("medseg-limit/big.png", bytes(5000))
    fs.pipe_file("medseg-limit/ok.png", bytes(1000))
    reader = _Reader(s3.storage_options, None, max_bytes=1000)
    with pytest.raises(ImageTooLargeError, match="big.png: more than max_bytes"):
        reader.read("s3://medseg-limit/big.png")
    assert reader.read("s3://medseg-limit/ok.png") == bytes(1000)
    fs.pipe_file("medseg-limit/empty.png", b"")  # a ranged GET of it is answered 416
    assert reader.read("s3://medseg-limit/empty.png") == b""


@pytest.mark.ray
def test_credentials_go_to_the_actors_when_only_the_output_is_on_s3(ray_cluster, bundles,
                                                                   monkeypatch):
    from pipelines import predict

    captured = []
    monkeypatch.setattr(predict.EnvCredentials, "capture",
                        classmethod(lambda cls: captured.append(1) or cls()))
    records = [Record(id="a", image_uri="/data/a.png")]
    predict.predict_records(records, seg_uri=bundles[0], cls_uri=None)
    assert not captured  # nothing on S3
    predict.predict_records(records, seg_uri=bundles[0], cls_uri=None,
                            extra_uris=["s3://bucket/nightly"])
    assert captured == [1]


def test_commit_never_writes_outside_the_output(tmp_path):
    from pipelines.segment_batch import Output, commit_rows

    out_dir = tmp_path / "deep" / "out"
    rows = [{"id": i, "source": "x", "label_name": name, "error": None, "mask_png": b"png",
             "label": 0, "true_label": -1, "seconds": 0.0}
            for i, name in [("../../evil", "benign"), ("/etc/passwd", "../../cls"),
                            ("a/../../../b", "名"), ("c", "..")]]
    commit_rows(Output(str(out_dir)), rows, "run")
    everything = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert everything and all(out_dir in p.parents for p in everything)
    assert {r["id"] for r in read_results(str(out_dir / "results"))} == {r["id"] for r in rows}


def test_commit_stores_text_that_is_not_valid_unicode(tmp_path):
    from pipelines.segment_batch import Output, commit_rows

    out_dir = tmp_path / "out"
    base = {"label": 0, "true_label": -1, "seconds": 0.5, "mask_png": b"png"}
    rows = [
        # a real path that is not UTF-8 in source and error: stored as \\x escapes
        {**base, "id": "caf\\xe9", "source": "/in/caf\udce9.png", "label_name": "benign",
         "error": None},
        {**base, "id": "bad", "source": "/in/b\udcffd.png", "label_name": None,
         "error": "ImageDecodeError: /in/b\udcffd.png: cannot identify image", "mask_png": None},
        # any other text Arrow cannot store: an error row instead of a failed batch
        {**base, "id": "odd\udce9", "source": "/in/odd\udce9.png", "label_name": "x\udce9",
         "error": None},
    ]
    summary = commit_rows(Output(str(out_dir)), rows, "run")
    assert summary.column("id").to_pylist() == ["caf\\xe9", "bad", "odd\\xe9"]
    by_id = {r["id"]: r for r in read_results(str(out_dir / "results"))}
    assert by_id["caf\\xe9"]["source"] == "/in/caf\\xe9.png"
    assert by_id["caf\\xe9"]["error"] is None and by_id["caf\\xe9"]["predicted_class"] == "benign"
    assert by_id["bad"]["error"] == "ImageDecodeError: /in/b\\xffd.png: cannot identify image"
    odd = by_id["odd\\xe9"]
    assert odd["predicted_class"] == "error" and odd["mask_path"] is None
    assert odd["source"] == "/in/odd\\xe9.png" and odd["label_name"] is None
    assert odd["error"].startswith("result row of 'odd\\\\xe9' cannot be stored: UnicodeEncodeError")
    assert local_files(out_dir, "masks") == {by_id["caf\\xe9"]["mask_path"]}  # no mask for odd


def test_threshold_outside_0_1_is_refused_at_start_up(tmp_path):
    from medseg_core.inference import check_threshold

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(encode_png(np.zeros((8, 8, 3), np.uint8)))
    for bad in ("1.5", "0", "1", "-0.2", "nan", "abc", "true"):
        with pytest.raises(ValueError, match=r"threshold=.* between 0 and 1"):
            run_job([f"input={tmp_path / 'in'}", "bundles.segmenter=/nonexistent/seg",
                     f"output={tmp_path / 'out'}", f"threshold={bad}"])
    assert not (tmp_path / "out").exists()  # refused before anything was read or written
    assert check_threshold(None) is None and check_threshold(0.3) == 0.3
    with pytest.raises(ValueError, match="threshold=True"):
        check_threshold(True)


def input_and_committed_output(tmp_path: Path) -> list[Path]:
    """`in/` with one image, and `out/` with a committed result part and mask (returned)."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(encode_png(np.zeros((8, 8, 3), np.uint8)))
    kept = [tmp_path / "out" / "results" / "predicted_class=benign" / "part-x.parquet",
            tmp_path / "out" / "masks" / "benign" / "x.png"]
    for f in kept:
        f.parent.mkdir(parents=True)
        f.write_bytes(b"committed")
    return kept


def test_bad_settings_are_refused_before_anything_is_deleted(tmp_path):
    """`overwrite=true` empties the output first: every setting is checked before that (a bad
    batch setting was refused by Ray only after the deletion), and `overwrite=no` (a string,
    so true) deleted everything."""
    kept = input_and_committed_output(tmp_path)
    base = [f"input={tmp_path / 'in'}", "bundles.segmenter=/nonexistent/seg",
            f"output={tmp_path / 'out'}"]
    for bad, message in ((["overwrite=no"], "overwrite='no' is a string"),
                         (["overwrite=off"], "overwrite='off' is a string"),
                         (["overwrite='false'"], "overwrite='false' is a string"),
                         (["overwrite=1"], "overwrite must be true or false"),
                         (["overwrite=true", "storage.forward_credentials=no"], "is a string"),
                         (["overwrite=true", "batch.batch_size=0"], "batch.batch_size must be"),
                         (["overwrite=true", "batch.concurrency=[2,1]"], "concurrency must be"),
                         (["overwrite=true", "batch.num_gpus=-1"], "num_gpus must be"),
                         (["overwrite=true", "batch.io_threads=0"], "io_threads must be"),
                         (["overwrite=true", "batch.max_pixels=0"], "max_pixels must be"),
                         (["overwrite=true", "batch.amp=1"], "batch.amp must be true or false"),
                         # failed in the actors' constructors (a bad device), or ran as null
                         (["overwrite=true", "batch.device=bogus"],
                          "batch.device must be auto, cpu, cuda or cuda:N"),
                         (["overwrite=true", "batch.device=cuda"], "needs batch.num_gpus > 0"),
                         (["overwrite=true", "ray_num_cpus=0"], "ray_num_cpus must be a number"),
                         (["overwrite=true", "limit=-1"], "limit must be"),
                         (["overwrite=true", "limit=2.5"], "limit must be"),
                         (["overwrite=true", "limit=true"], "limit must be"),
                         (["overwrite=true", "+storage.input.endpoint=http://x"],
                          "storage.input: unknown setting"),
                         (["overwrite=true", "storage.output.anonymous=1"],
                          "storage.output.anonymous must be true or false"),
                         # credentials: named by their own setting (they said data.*), and
                         # never in a runtime_env, which Ray writes to its logs
                         (["overwrite=true",
                           "+storage.storage_options.client_kwargs.aws_secret_access_key=s"],
                          r"storage\.storage_options\.client_kwargs\.aws_secret_access_key: "
                          "credentials must not be in the config"),
                         (["overwrite=true", "storage.bundles.storage_options={secret: s}"],
                          r"storage\.bundles\.storage_options\.secret: credentials"),
                         (["overwrite=true",
                           "ray_runtime_env={env_vars: {AWS_SECRET_ACCESS_KEY: s}}"],
                          r"ray_runtime_env\.env_vars\.AWS_SECRET_ACCESS_KEY: a secret must "
                          "not be in a runtime_env")):
        with pytest.raises(ValueError, match=message):
            run_job([*base, *bad])
        assert all(f.read_bytes() == b"committed" for f in kept), bad


def test_a_missing_bundle_or_one_of_another_task_is_refused_before_anything_is_deleted(
        bundles, tmp_path, monkeypatch):
    """A classifier bundle given as the segmenter (or the reverse) made an error row of every
    image, recorded as done; a missing bundle was said to have "no version"."""
    import pipelines.segment_batch as sb

    monkeypatch.setattr(sb, "_process", lambda *a, **k: pytest.fail("processed images"))
    seg, cls = bundles
    kept = input_and_committed_output(tmp_path)
    base = [f"input={tmp_path / 'in'}", f"output={tmp_path / 'out'}", "overwrite=true"]
    for bad, message in (
            ([f"bundles.segmenter={cls}"],
             r"^bundles.segmenter: model bundle \S+/cls is a 'classification' bundle; "
             r"bundles.segmenter needs a 'segmentation' one$"),
            ([f"bundles.segmenter={seg}", f"bundles.classifier={seg}"],
             r"^bundles.classifier: model bundle \S+/seg is a 'segmentation' bundle; "
             r"bundles.classifier needs a 'classification' one$"),
            (["bundles.segmenter=/nonexistent/seg"],
             r"^bundles.segmenter: model bundle /nonexistent/seg does not exist$")):
        with pytest.raises(ValueError, match=message):
            run_job([*base, *bad])
        assert all(f.read_bytes() == b"committed" for f in kept), bad
    assert sorted(p.name for p in (tmp_path / "out").rglob("*") if p.is_file()) == \
        ["part-x.parquet", "x.png"]


def test_gpu_actors_on_a_local_cluster_without_gpus_are_refused(ray_cluster, bundles, tmp_path,
                                                                synthetic_archive):
    """batch=gpu on the local Ray instance this process started, which has no GPU: refused at
    once (the job waited for ever for a node that nothing would add), nothing committed."""
    if ray_cluster.cluster_resources().get("GPU"):
        pytest.skip("this machine has a GPU")
    seg, cls = bundles
    with pytest.raises(RuntimeError, match=r"one actor of the bulk job's pool needs 1 CPU, 0.25 "
                                           r"GPU.*0 GPU \(Ray sees no GPU on this machine\)"):
        run_job([f"input={synthetic_archive}", "layout=busi", f"bundles.segmenter={seg}",
                 f"bundles.classifier={cls}", f"output={tmp_path / 'out'}", "batch=gpu",
                 "batch.num_cpus=1"])
    assert read_results(str(tmp_path / "out" / "results")) == []


def test_a_mistyped_input_fails_before_the_output_is_touched(bundles, tmp_path, capsys):
    """`input=/nonexistent` or `layout=busi` on plain images ran to a successful manifest of 0
    images (a nightly job would never notice): an error naming the URL (and the layout and the
    files skipped), before `overwrite=true` deletes anything. An empty folder (nothing arrived
    tonight) is a no-op run that says so."""
    from medseg_core.layouts import LayoutError

    seg, cls = bundles
    plain = tmp_path / "plain"
    plain.mkdir()
    for i in range(3):
        (plain / f"img{i}.png").write_bytes(encode_png(np.zeros((8, 8, 3), np.uint8)))
    kept = tmp_path / "out" / "masks" / "benign" / "x.png"
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"committed")
    missing = str(tmp_path / "nonexistent")
    for url, layout, message in (
            (missing, "images", f"{missing}: the archive does not exist"),
            (str(plain), "busi", f"{plain}: layout 'busi' found no record among the 3 file\\(s\\) "
             "found, 3 skipped by the layout .*check `layout`")):
        with pytest.raises(LayoutError, match=message):
            run_job([f"input={url}", f"layout={layout}", f"bundles.segmenter={seg}",
                     f"bundles.classifier={cls}", f"output={tmp_path / 'out'}", "overwrite=true"])
        assert kept.read_bytes() == b"committed"
        assert not (tmp_path / "out" / "manifest.json").exists()
    (tmp_path / "empty").mkdir()
    capsys.readouterr()
    m = run_job([f"input={tmp_path / 'empty'}", "layout=images", f"bundles.segmenter={seg}",
                 f"bundles.classifier={cls}", f"output={tmp_path / 'out'}"])
    assert m["input"]["images"] == 0 and m["input"]["skipped_files"] == 0
    assert m["run"]["processed"] == 0 and m["run"]["complete"]
    assert f"the input folder {tmp_path / 'empty'} is empty" in capsys.readouterr().out
    # a file the layout passes over is named with its reason on the terminal, not only in
    # the manifest (two files of one id, a.png and a.jpg, lost one without a word)
    (plain / "img0.jpg").write_bytes(encode_png(np.zeros((8, 8, 3), np.uint8)))
    m = run_job([f"input={plain}", "layout=images", f"bundles.segmenter={seg}",
                 f"bundles.classifier={cls}", f"output={tmp_path / 'dup-out'}", "limit=0"])
    assert m["input"]["skipped_files"] == 1
    assert re.search(r"^  skipped .*img0\.(png|jpg): duplicate id 'img0'", capsys.readouterr().out,
                     re.M)


def test_each_url_gets_the_storage_settings_of_its_role():
    from pipelines.segment_batch import storage_options

    cfg = job_config(["input=s3://public/archive", "output=s3://mine/nightly",
                      "bundles.segmenter=s3://mine/seg", "storage.endpoint_url=http://shared",
                      "storage.input.anonymous=true",
                      "storage.output.endpoint_url=http://results", "storage.region=eu-west-1"])
    so_in = storage_options(cfg, "input", "s3://public/archive")
    so_out = storage_options(cfg, "output", "s3://mine/nightly")
    so_bundles = storage_options(cfg, "bundles", "s3://mine/seg")
    assert so_in == {"anon": True, "client_kwargs": {"endpoint_url": "http://shared",
                                                     "region_name": "eu-west-1"}}
    assert so_out == {"client_kwargs": {"endpoint_url": "http://results",
                                        "region_name": "eu-west-1"}}
    assert so_bundles == {"client_kwargs": {"endpoint_url": "http://shared",
                                            "region_name": "eu-west-1"}}
    assert storage_options(cfg, "input", "/local/archive") is None
    # a role's own setting also beats the shared fsspec options' spelling of it
    cfg = job_config(["input=s3://a/x", "output=s3://b/y", "bundles.segmenter=s3://b/seg",
                      "+storage.storage_options.client_kwargs.endpoint_url=http://shared",
                      "+storage.storage_options.client_kwargs.region_name=us-east-1",
                      "+storage.storage_options.anon=true",
                      "storage.input.endpoint_url=http://hospital", "storage.input.region=eu-1",
                      "storage.output.anonymous=false"])
    assert storage_options(cfg, "input", "s3://a/x") == {
        "anon": True, "client_kwargs": {"endpoint_url": "http://hospital", "region_name": "eu-1"}}
    assert storage_options(cfg, "output", "s3://b/y") == {
        "client_kwargs": {"endpoint_url": "http://shared", "region_name": "us-east-1"}}
    assert storage_options(cfg, "bundles", "s3://b/seg") == {
        "anon": True, "client_kwargs": {"endpoint_url": "http://shared", "region_name": "us-east-1"}}


def test_a_part_that_fails_to_read_is_not_quarantined(tmp_path, monkeypatch):
    """Only a part whose bytes do not parse is moved out of results/: a read that fails
    (a timeout, a 503) raises, and the part stays where it is."""
    import pyarrow.parquet as pq

    import pipelines.segment_batch as job

    part = tmp_path / "out" / "results" / "predicted_class=benign" / "part-x.parquet"
    part.parent.mkdir(parents=True)
    pq.write_table(job.PART_SCHEMA.empty_table(), part)
    out = job.Output(str(tmp_path / "out"))
    assert job.State(out).parts == ["results/predicted_class=benign/part-x.parquet"]

    def timeout(self, rel):
        raise TimeoutError("read timed out")

    monkeypatch.setattr(job.Output, "read", timeout)
    with pytest.raises(TimeoutError):
        job.State(out)
    assert part.exists() and not (tmp_path / "out" / "quarantine").exists()
    monkeypatch.undo()
    part.write_bytes(b"PAR1 not really")
    state = job.State(out)
    assert state.parts == [] and not part.exists()
    assert [q["part"] for q in out.quarantined] == ["results/predicted_class=benign/part-x.parquet"]


def test_null_settings_mean_their_defaults(tmp_path):
    from pipelines.segment_batch import check_settings

    check_settings(job_config([f"input={tmp_path}", "output=/x", "bundles.segmenter=/y",
                               "compact_rows=null", "compact_min_parts=null",
                               "storage.anonymous=null", "overwrite=null"]))


# ----------------------------------------------------------------------------------------------
# The whole job on a real S3-compatible server


@pytest.mark.s3
@pytest.mark.ray
def test_s3_archive_with_corrupt_files_gives_exact_outputs(s3, ray_cluster, tmp_path,
                                                         monkeypatch):
    import s3fs

    local = make_busi_archive(tmp_path / "busi", per_class=3, seed=1)
    bad = add_corrupt_files(local)
    image = sample_image(np.random.default_rng(9))
    (local / "benign" / "ünïcode 名前 (1).png").write_bytes(encode_png(image))
    (local / "benign" / "ünïcode 名前 (1)_mask.png").write_bytes(
        encode_mask_png(np.ones(image.shape[:2], np.uint8)))
    # '::' is fsspec's URL-chain separator: read first, it broke the actor's S3 reader for
    # every later image
    (local / "benign" / "0::colon (1).png").write_bytes(encode_png(image))
    (local / "benign" / "0::colon (1)_mask.png").write_bytes(
        encode_mask_png(np.ones(image.shape[:2], np.uint8)))
    for bucket in ("medseg-in", "medseg-models", "medseg-out"):
        s3.create_bucket(bucket)
    s3.upload_dir(local, "s3://medseg-in/archive")
    # a "folder" placeholder, as S3 consoles and sync tools make: the sweep took it for a mask
    s3.client().put_object(Bucket="medseg-out", Key="nightly/masks/benign/", Body=b"")
    seg_uri, cls_uri = save_bundles("s3://medseg-models/v1", storage_options=s3.storage_options)

    # credentials only in the environment (the Ray workers never see it: forwarded in memory)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(key, s3.env[key])
    overrides = ["input=s3://medseg-in/archive", "layout=busi", f"bundles.segmenter={seg_uri}",
                 f"bundles.classifier={cls_uri}", "output=s3://medseg-out/nightly",
                 f"storage.endpoint_url={s3.endpoint}", "batch.batch_size=4"]
    # the nightly pattern: the output already holds results when new images come. The driver
    # kept the listings of the first results' folders, so the parts the actors added were
    # "not found", their rows left out and their masks deleted as orphans
    first = run_job([*overrides, "limit=5"])
    assert first["run"]["processed"] == 5 and not first["run"]["complete"]
    manifest = run_job(overrides)

    fs = s3fs.S3FileSystem(**s3.storage_options)
    fs.invalidate_cache()
    records = list_records(str(local), "busi").records
    ref = reference(seg_uri, cls_uri, records, storage_options=s3.storage_options)
    assert set(ref) == {r.id for r in records} - set(bad)

    rows = read_results("s3://medseg-out/nightly/results", filesystem=fs)
    by_id = {r["id"]: r for r in rows}
    assert len(rows) == len(by_id) == len(records) == 15
    assert set(by_id) == {r.id for r in records}
    labels = {r.id: r.label for r in records}
    seg_counts = []
    for rid, out in ref.items():
        row = by_id[rid]
        assert_matches(row, out)
        assert row["predicted_class"] == row["label_name"] == out["label_name"]
        assert row["source"] == f"s3://medseg-in/archive/{rid}.png"
        assert row["true_label"] == labels[rid]
        assert (row["segmenter_version"], row["classifier_version"]) == ("seg-v1", "cls-v1")
        counts = confusion_counts(out["mask"], out["truth"])[0]
        seg_counts.append(counts)
        assert [row[k] for k in ("tp", "fp", "fn", "tn")] == [int(c) for c in counts]
        assert row["dice"] == metrics_from_counts(counts)["dice"]
        assert row["iou"] == metrics_from_counts(counts)["iou"]
        mask = decode_png_mask(fs.cat_file(f"medseg-out/nightly/{row['mask_path']}"))
        np.testing.assert_array_equal(mask, out["mask"])  # original resolution, identical
    for rid, name in bad.items():
        row = by_id[rid]
        assert row["predicted_class"] == "error" and row["mask_path"] is None
        assert f"s3://medseg-in/archive/{name}" in row["error"]
        assert row["label"] == -1 and np.isnan(row["dice"])

    keys = {k.removeprefix("medseg-out/") for k in fs.find("medseg-out")
            if not k.endswith("/")}  # the placeholder stays
    masks = {k.removeprefix("nightly/") for k in keys if k.startswith("nightly/masks/")}
    assert masks == {r["mask_path"] for r in rows if r["error"] is None}
    assert all(k.startswith("nightly/") for k in keys)
    assert {k for k in keys if not k.startswith(("nightly/masks/", "nightly/results/"))} == {
        "nightly/manifest.json", f"nightly/runs/{first['run_id']}.json",
        f"nightly/runs/{manifest['run_id']}.json", "nightly/sources.parquet"}

    stored = json.loads(fs.cat_file("medseg-out/nightly/manifest.json"))
    assert stored == manifest
    expected_classes = Counter(out["label_name"] for out in ref.values())
    totals = manifest["totals"]
    assert totals["images"] == 15 and totals["errors"] == 4 and totals["masks"] == 11
    assert totals["counts_by_class"] == {**dict.fromkeys(CLASS_NAMES, 0), **expected_classes,
                                         "error": 4}
    assert sorted(e["id"] for e in totals["error_list"]) == sorted(bad)
    assert manifest["run"]["processed"] == 10 and manifest["run"]["already_done"] == 5
    assert manifest["repair"]["orphan_masks_removed"] == 0
    assert manifest["run"]["errors"] == 4 - first["run"]["errors"]
    assert manifest["run"]["complete"] and manifest["run"]["images_per_s"] > 0
    assert manifest["bundles"]["segmenter"]["version"] == "seg-v1"
    assert manifest["bundles"]["classifier"]["version"] == "cls-v1"
    summed = np.sum(seg_counts, axis=0)
    seg = manifest["segmentation"]
    assert seg["images"] == 11 and seg["counts"] == [int(c) for c in summed]
    assert seg["dice"] == pytest.approx(metrics_from_counts(summed)["dice"])
    assert seg["iou"] == pytest.approx(metrics_from_counts(summed)["iou"])
    assert "medsegtest" not in json.dumps(manifest)  # no credentials anywhere

    again = run_job(overrides)  # idempotent: nothing to do, nothing rewritten
    assert again["run"]["processed"] == 0 and again["run"]["already_done"] == 15
    fs.invalidate_cache()
    after = {k.removeprefix("medseg-out/") for k in fs.find("medseg-out") if not k.endswith("/")}
    assert after - keys == {f"nightly/runs/{again['run_id']}.json"}


# ----------------------------------------------------------------------------------------------
# Resume, rerun, repair, overwrite


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.ray
def test_input_and_output_on_different_object_stores(s3, ray_cluster, bundles, tmp_path,
                                                     monkeypatch):
    """A hospital archive on one S3-compatible store, results on another: each URL is read or
    written with its own `storage.<role>` endpoint (with one shared endpoint the results went
    to the input's store, where SeaweedFS made the bucket on the first write)."""
    import s3fs
    from s3server import start_moto

    local = make_busi_archive(tmp_path / "busi", per_class=1, seed=3)
    s3.create_bucket("medseg-two-in")
    s3.upload_dir(local, "s3://medseg-two-in/archive")
    other = start_moto()
    try:
        other.create_bucket("medseg-two-out")
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
            monkeypatch.setenv(key, s3.env[key])
        base = ["input=s3://medseg-two-in/archive", "layout=busi",
                f"bundles.segmenter={bundles[0]}", f"bundles.classifier={bundles[1]}",
                "output=s3://medseg-two-out/nightly", "batch.batch_size=4"]
        manifest = run_job([*base, f"storage.input.endpoint_url={s3.endpoint}",
                            f"storage.output.endpoint_url={other.endpoint}"])
        records = list_records(str(local), "busi").records
        assert manifest["run"]["processed"] == len(records) == 3
        assert manifest["totals"]["errors"] == 0
        rows = read_results("s3://medseg-two-out/nightly/results",
                            filesystem=s3fs.S3FileSystem(**other.storage_options))
        assert sorted(r["id"] for r in rows) == sorted(r.id for r in records)
        assert all(r["source"].startswith("s3://medseg-two-in/archive/") for r in rows)
        in_fs = s3fs.S3FileSystem(**s3.storage_options)
        assert not any("nightly" in k for k in in_fs.find("medseg-two-in"))
        assert not in_fs.exists("medseg-two-out/nightly")
    finally:
        other.stop()


def test_bundles_are_read_with_their_own_storage_settings(s3, ray_cluster, bundles, tmp_path,
                                                          monkeypatch):
    """An archive on another store (`storage.input.endpoint_url`), the bundles on the one the
    environment names (no `storage.bundles.*`): the actors read the bundles from it. They read
    them with the input's options instead (here the other store, where no bundle is; with
    `storage.input.anonymous=true`, unsigned), although the driver had checked them rightly."""
    from s3server import start_moto

    local = make_busi_archive(tmp_path / "busi", per_class=1, seed=4)
    s3.create_bucket("medseg-models")
    for name, path in zip(("seg", "cls"), bundles):
        s3.upload_dir(path, f"s3://medseg-models/{name}")
    other = start_moto()
    try:
        other.upload_dir(local, "s3://hospital/archive")
        for key, value in s3.env.items():  # the bundles' store is the environment's
            monkeypatch.setenv(key, value)
        manifest = run_job(["input=s3://hospital/archive", "layout=busi",
                            "bundles.segmenter=s3://medseg-models/seg",
                            "bundles.classifier=s3://medseg-models/cls",
                            f"output={tmp_path / 'out'}", "batch.batch_size=4",
                            f"storage.input.endpoint_url={other.endpoint}"])
    finally:
        other.stop()
    assert manifest["run"]["processed"] == 3 and manifest["totals"]["errors"] == 0
    assert manifest["bundles"]["segmenter"]["uri"] == "s3://medseg-models/seg"


def test_limit_rerun_repair_and_overwrite_keep_exactly_once(ray_cluster, bundles, tmp_path):
    archive = make_busi_archive(tmp_path / "busi", per_class=4, seed=2)
    bad = add_corrupt_files(archive)
    ids = {r.id for r in list_records(str(archive), "busi").records}
    out = tmp_path / "out"
    base = [f"input={archive}", "layout=busi", f"bundles.segmenter={bundles[0]}",
            f"bundles.classifier={bundles[1]}", f"output={out}", "batch.batch_size=3",
            "batch.concurrency=1"]

    first = run_job([*base, "limit=5"])
    assert first["run"]["processed"] == 5 and not first["run"]["complete"]
    assert first["run"]["remaining"] == len(ids) - 5
    assert len(check_exactly_once(out)) == 5

    second = run_job(base)
    assert second["run"]["processed"] == len(ids) - 5 and second["run"]["complete"]
    rows = check_exactly_once(out, ids)
    assert second["totals"]["images"] == len(ids) == 16

    snapshot = {p: (out / p).stat().st_mtime_ns for sub in RESULT_DIRS
                for p in local_files(out, sub)}
    third = run_job(base)
    assert third["run"]["processed"] == 0
    assert {p: (out / p).stat().st_mtime_ns for sub in RESULT_DIRS
            for p in local_files(out, sub)} == snapshot  # untouched

    # retrying errors keeps their rows until a retry is committed (none here: limit=0)
    kept = run_job([*base, "retry_errors=true", "limit=0"])
    assert kept["run"]["processed"] == 0 and kept["totals"]["errors"] == len(bad)
    assert {r["id"] for r in check_exactly_once(out, ids) if r["error"]} == set(bad)

    # damage: a straggler's duplicate part, an orphan mask, a lost mask, a temp file
    parts = sorted(p for p in local_files(out, "results") if "=error" not in p)
    dup_src = out / parts[0]
    dup_ids = {r["id"] for r in read_results(str(dup_src))}
    other = "normal" if "=normal" not in parts[0] else "benign"
    (out / f"results/predicted_class={other}").mkdir(exist_ok=True)
    shutil.copy(dup_src, out / f"results/predicted_class={other}/part-straggler.parquet")
    (out / "masks" / "benign").mkdir(exist_ok=True)
    (out / "masks" / "benign" / "orphan-0000000000000000.png").write_bytes(b"x")
    lost = next(r for r in rows if r["error"] is None and r["id"] not in dup_ids)
    (out / lost["mask_path"]).unlink()
    (out / "results" / ".tmp-dead-part-x.parquet").write_bytes(b"partial")
    repaired = run_job([*base, "retry_errors=true"])
    assert repaired["repair"] == {"duplicate_rows_removed": len(dup_ids),
                                  "rows_without_mask_removed": 1, "orphan_masks_removed": 1,
                                  "temporary_files_removed": 1, "parts_merged": 0,
                                  "unreadable_parts_quarantined": []}
    # processed again: the image whose mask was lost, and the errors (retry_errors)
    assert repaired["run"]["processed"] == 1 + len(bad)
    assert repaired["run"]["errors_retried"] == len(bad) and kept["run"]["errors_retried"] == 0
    assert repaired["totals"]["errors"] == len(bad)
    rows = check_exactly_once(out, ids)
    assert {r["run_id"] for r in rows if r["id"] == lost["id"] or r["error"]} == {
        repaired["run_id"]}

    redo = run_job([*base, "overwrite=true"])
    assert redo["run"]["processed"] == len(ids) and redo["totals"]["images"] == len(ids)
    after = check_exactly_once(out, ids)
    assert {r["run_id"] for r in after} == {redo["run_id"]}

    merged = run_job([*base, "compact_rows=100", "compact_min_parts=2"])  # small parts merged
    parts = [p for p in local_files(out, "results") if p.endswith(".parquet")]
    assert merged["run"]["processed"] == 0 and merged["repair"]["parts_merged"] > 0
    assert len(parts) == len({p.split("/")[1] for p in parts})  # one part per class left
    assert canonical(check_exactly_once(out, ids)) == canonical(after)  # same rows

    # a part left empty (a power cut before the data reached the disk, a partial copy) is
    # moved out of results/ and its images processed again; every run failed on it before
    victim = sorted(p for p in local_files(out, "results") if "=error" not in p)[0]
    lost_ids = {r["id"] for r in read_results(str(out / victim))}
    (out / victim).write_bytes(b"")
    healed = run_job(base)
    assert healed["run"]["processed"] == len(lost_ids)
    [q] = healed["repair"]["unreadable_parts_quarantined"]
    assert q["part"] == victim and "ArrowInvalid" in q["reason"]
    assert (out / q["moved_to"]).exists() and q["moved_to"].startswith("quarantine/")
    assert canonical([{k: v for k, v in r.items() if k not in ("run_id", "processed_at",
                                                               "seconds")}
                      for r in check_exactly_once(out, ids)]) == canonical(
        [{k: v for k, v in r.items() if k not in ("run_id", "processed_at", "seconds")}
         for r in after])

    # with a limit, new images come before retried errors, which would otherwise take it
    for i in range(2):
        image = sample_image(np.random.default_rng(20 + i))
        (archive / "benign" / f"zz new {i}.png").write_bytes(encode_png(image))
        (archive / "benign" / f"zz new {i}_mask.png").write_bytes(
            encode_mask_png(np.zeros(image.shape[:2], np.uint8)))
    news = run_job([*base, "retry_errors=true", "limit=2"])
    assert news["run"]["processed"] == 2 and news["run"]["errors_retried"] == 0
    assert {r["id"]: r["error"] for r in check_exactly_once(out)
            if r["run_id"] == news["run_id"]} == {"benign/zz new 0": None, "benign/zz new 1": None}


@pytest.mark.ray
def test_a_rerun_with_new_bundles_names_the_images_done_by_the_old_ones(ray_cluster, bundles,
                                                                        tmp_path, capsys):
    """Done images are skipped whatever bundles made them; a run with retrained bundles says how
    many that leaves to the old ones, in its output and its manifest."""
    archive = make_busi_archive(tmp_path / "busi", per_class=2, seed=4)
    out = tmp_path / "out"
    base = [f"input={archive}", "layout=busi", f"bundles.classifier={bundles[1]}",
            f"output={out}", "batch.concurrency=1"]
    first = run_job([*base, f"bundles.segmenter={bundles[0]}"])
    assert first["run"]["processed"] == 6 and first["run"]["done_by_other_bundles"] == []
    capsys.readouterr()
    retrained = tmp_path / "seg-v2"
    shutil.copytree(bundles[0], retrained)
    (retrained / "version").write_text("seg-v2\n")

    again = run_job([*base, f"bundles.segmenter={retrained}"])
    assert again["run"]["processed"] == 0 and again["run"]["already_done"] == 6
    assert again["run"]["done_by_other_bundles"] == [
        {"segmenter": "seg-v1", "classifier": "cls-v1", "images": 6}]
    assert ("6 of the images already done were segmented by other bundles (segmenter seg-v1, "
            "classifier cls-v1: 6)") in capsys.readouterr().out
    redo = run_job([*base, f"bundles.segmenter={retrained}", "overwrite=true"])
    assert redo["run"]["processed"] == 6 and redo["run"]["done_by_other_bundles"] == []
    assert run_job([*base, f"bundles.segmenter={retrained}"])["run"]["done_by_other_bundles"] == []
    assert "segmented by other bundles" not in capsys.readouterr().out

@pytest.mark.ray
def test_an_image_replaced_under_its_name_is_processed_again(ray_cluster, bundles, tmp_path,
                                                              capsys):
    """Done was decided by id alone: an image replaced under its name (a nightly copy still
    being written when listed, then completed) kept its old row, and a mask of the old
    image's size, for ever. A rerun at another threshold mixed masks of two thresholds
    without a word."""
    import os

    from medseg_core.io import encode_mask_png, encode_png

    archive = make_busi_archive(tmp_path / "busi", per_class=2, seed=5)
    out = tmp_path / "out"
    base = [f"input={archive}", "layout=busi", f"bundles.segmenter={bundles[0]}",
            f"bundles.classifier={bundles[1]}", f"output={out}", "batch.concurrency=1"]
    assert run_job(base)["run"]["processed"] == 6
    image = archive / "benign" / "benign (1).png"
    image.write_bytes(encode_png(np.full((23, 57, 3), 90, np.uint8)))
    (archive / "benign" / "benign (1)_mask.png").write_bytes(
        encode_mask_png(np.ones((23, 57), np.uint8)))
    os.utime(image, (1, 1))  # another size and modification time
    capsys.readouterr()
    again = run_job([*base, "threshold=0.3"])
    said = capsys.readouterr().out
    assert again["run"]["processed"] == 1 and again["run"]["inputs_changed"] == 1
    assert "1 of the images already done changed since" in said
    assert again["run"]["done_at_other_thresholds"] == [{"threshold": None, "images": 5}]
    assert "5 of the images already done were segmented at another threshold (5 at the " \
           "bundle's)" in said
    rows = {r["id"]: r for r in check_exactly_once(out)}
    assert (rows["benign/benign (1)"]["height"], rows["benign/benign (1)"]["width"]) == (23, 57)
    assert run_job([*base, "threshold=0.3"])["run"]["processed"] == 0  # now up to date


@pytest.mark.ray
def test_killed_driver_then_rerun_processes_every_image_once(ray_cluster, bundles, tmp_path):
    import ray

    rng = np.random.default_rng(4)
    folder = tmp_path / "incoming"
    folder.mkdir()
    for i in range(30):
        (folder / f"scan {i:02d}.png").write_bytes(encode_png(sample_image(rng, 150, 220)))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    ids = {r.id for r in list_records(str(folder), "images").records}
    out = tmp_path / "out"
    overrides = [f"input={folder}", "layout=images", f"bundles.segmenter={bundles[0]}",
                 f"bundles.classifier={bundles[1]}", f"output={out}", "batch.batch_size=1",
                 "batch.concurrency=1"]
    address = ray.get_runtime_context().gcs_address
    cmd = [sys.executable, str(ROOT / "pipelines" / "segment_batch.py"), *overrides,
           f"ray_address={address}",
           f"ray_runtime_env={{env_vars: {{PYTHONPATH: '{ROOT}'}}}}"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    log = open(tmp_path / "driver.log", "wb")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if len([p for p in local_files(out, "results") if p.endswith(".parquet")]) >= 3:
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "driver.log").read_text()[-3000:]
    committed = {r["id"] for r in read_results(str(out / "results"))}
    assert 0 < len(committed) < len(ids)  # killed midway

    manifest = run_job(overrides)
    assert manifest["run"]["complete"] and manifest["totals"]["images"] == len(ids)
    rows = check_exactly_once(out, ids)
    assert [r["id"] for r in rows if r["error"]] == ["broken"]


@pytest.mark.ray
def test_malicious_names_stay_inside_the_output(ray_cluster, bundles, tmp_path, monkeypatch):
    import pipelines.segment_batch as job

    rng = np.random.default_rng(6)
    folder = tmp_path / "in"
    (folder / "deep" / "er").mkdir(parents=True)
    names = ["0::colon.png", "a b.png", "ünïcode 名前.png", "x..evil.png",
             "-rf --no-preserve-root.png", "%2e%2e%2fx.png", "deep/er/x y.png"]
    for name in names:
        (folder / name).write_bytes(encode_png(sample_image(rng)))
    real = str(folder / "a b.png")
    extra = [Record("../../evil", real), Record("/etc/passwd", real),
             Record("a/../../../b", real), Record("..", real)]
    listed = job.list_input

    def with_hostile_ids(cfg, so):
        listing = listed(cfg, so)
        return Listing(listing.records + extra, listing.skipped, listing.class_names)

    monkeypatch.setattr(job, "list_input", with_hostile_ids)
    out = tmp_path / "job" / "out"
    manifest = run_job([f"input={folder}", "layout=images", f"bundles.segmenter={bundles[0]}",
                        f"output={out}", "batch.batch_size=16"])  # segmentation only
    expected = {n.rsplit(".", 1)[0] for n in names} | {r.id for r in extra}
    rows = check_exactly_once(out, expected)
    assert manifest["totals"]["counts_by_class"] == {"unclassified": len(expected)}
    assert all(r["label"] == -1 and r["predicted_class"] == "unclassified" for r in rows)
    written = [p for p in tmp_path.rglob("*") if p.is_file() and folder not in p.parents]
    assert written and all(out in p.parents for p in written)
    assert not (tmp_path / "evil").exists() and not list(tmp_path.glob("*evil*"))


@pytest.mark.ray
def test_file_names_not_utf8_complete_with_a_row_each(ray_cluster, bundles, tmp_path, capsys):
    rng = np.random.default_rng(8)
    folder = tmp_path / "in"
    raw = os.fsencode(folder)
    os.makedirs(os.path.join(raw, b"d\xe9p"))
    files = {b"caf\xe9.png": encode_png(sample_image(rng)), b"ok.png": encode_png(sample_image(rng)),
             b"d\xe9p/x.png": encode_png(sample_image(rng)), b"broken \xff.png": b"not a png"}
    for name, data in files.items():
        try:
            with open(os.path.join(raw, name), "wb") as f:
                f.write(data)
        except OSError:
            pytest.skip("this filesystem refuses file names that are not UTF-8")
    records = list_records(str(folder), "images").records
    ids = {"caf\\xe9", "ok", "d\\xe9p/x", "broken \\xff"}
    assert {r.id for r in records} == ids
    ref = reference(bundles[0], bundles[1], records)
    assert set(ref) == ids - {"broken \\xff"}

    out = tmp_path / "out"
    overrides = [f"input={folder}", "layout=images", f"bundles.segmenter={bundles[0]}",
                 f"bundles.classifier={bundles[1]}", f"output={out}", "batch.batch_size=8",
                 "batch.concurrency=1"]
    manifest = run_job(overrides, release=lambda: print("RELEASED"))
    # the closing line comes after the entry point has left Ray (pipelines.cluster.disconnect)
    printed = capsys.readouterr().out.splitlines()
    closing = [i for i, line in enumerate(printed) if line.startswith("[segment_batch] processed")]
    assert closing == [printed.index("RELEASED") + 1]
    rows = check_exactly_once(out, ids)
    by_id = {r["id"]: r for r in rows}
    for rid, expected in ref.items():
        assert_matches(by_id[rid], expected)
        assert by_id[rid]["source"] == f"{folder}/{rid}.png"  # the real path, escaped
        mask = decode_png_mask((out / by_id[rid]["mask_path"]).read_bytes())
        np.testing.assert_array_equal(mask, expected["mask"])
    broken = by_id["broken \\xff"]
    assert broken["predicted_class"] == "error" and broken["mask_path"] is None
    assert f"{folder}/broken \\xff.png" in broken["error"]
    assert manifest["input"]["images"] == 4 and manifest["input"]["skipped_files"] == 0
    assert manifest["run"]["processed"] == 4 and manifest["run"]["errors"] == 1
    assert manifest["run"]["complete"] and manifest["run"]["remaining"] == 0
    totals = manifest["totals"]
    assert totals["images"] == 4 and totals["errors"] == 1 and totals["masks"] == 3
    assert [e["id"] for e in totals["error_list"]] == ["broken \\xff"]
    assert totals["counts_by_class"] == {
        **dict.fromkeys(CLASS_NAMES, 0), **Counter(o["label_name"] for o in ref.values()),
        "error": 1}
    text = (out / "manifest.json").read_bytes().decode("utf-8")
    assert json.loads(text) == manifest and "\\ud" not in text  # no lone surrogates

    again = run_job(overrides)  # the same ids next night: nothing to redo
    assert again["run"]["processed"] == 0 and again["run"]["already_done"] == 4
    assert again["run"]["complete"]


def test_output_inside_input_is_refused(bundles, tmp_path):
    (tmp_path / "a.png").write_bytes(encode_png(np.zeros((8, 8, 3), np.uint8)))
    with pytest.raises(ValueError, match="must not contain each other"):
        run_job([f"input={tmp_path}", f"bundles.segmenter={bundles[0]}",
                 f"output={tmp_path / 'results'}"])
    # the same through a symlink: the next run would read its own masks as new images
    (tmp_path / "in").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "in")
    with pytest.raises(ValueError, match="must not contain each other"):
        run_job([f"input={tmp_path / 'in'}", f"bundles.segmenter={bundles[0]}",
                 f"output={tmp_path / 'link' / 'results'}"])


@pytest.mark.ray
@pytest.mark.shared_data
def test_busi_full_subset_masks_at_original_size(ray_cluster, bundles, shared_data, tmp_path):
    archive = shared_data / "busi_full"
    if not archive.is_dir():
        pytest.skip("busi_full is absent")
    out = tmp_path / "out"
    manifest = run_job([f"input={archive}", "layout=busi", f"bundles.segmenter={bundles[0]}",
                        f"bundles.classifier={bundles[1]}", f"output={out}", "limit=3"])
    assert manifest["run"]["processed"] == 3 and not manifest["run"]["complete"]
    rows = check_exactly_once(out)
    for row in rows:
        with Image.open(row["source"]) as im:
            assert (row["width"], row["height"]) == im.size
        with Image.open(out / row["mask_path"]) as m:
            assert m.size == (row["width"], row["height"])
        assert row["tp"] is not None and not np.isnan(row["dice"])
