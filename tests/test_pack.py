"""pipelines/pack.py: raw archive -> sharded Parquet + manifest, and reading it back."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.data import (
    build_datasets,
    data_report,
    is_packed,
    list_archive,
    load_any_record,
    load_splits,
    parse_packed_uri,
    read_manifest,
    train_epoch_dataset,
)
from pipelines.pack import pack_archive
from tests.test_data_pipeline import digests, make_cfg

ROOT_DIR = Path(__file__).resolve().parents[1]


def pack(tmp_path: Path, url: str, out: Path | str, *overrides: str, backend: str = "ray") -> dict:
    cfg = make_cfg(tmp_path, url, f"+pack.out={out}", "+pack.shard_size=6",
                   "+pack.row_group_rows=4", f"+pack.backend={backend}", *overrides)
    return pack_archive(cfg)


def packed_cfg(tmp_path: Path, out: Path, *overrides: str) -> dict:
    return make_cfg(tmp_path, str(out), "data=packed", *overrides)


@pytest.mark.ray
def test_packed_and_raw_yield_the_same_records(ray_cluster, synthetic_archive, tmp_path):
    out = tmp_path / "packed"
    manifest = pack(tmp_path, synthetic_archive, out)
    assert manifest["records"] == 15 and manifest["skipped"] == []
    assert [s["rows"] for s in manifest["shards"]] == [6, 6, 3]
    assert manifest["shards"][0]["row_groups"] == [4, 2]
    table = pq.read_table(next(out.glob("shard-*-00000.parquet")))
    assert {"id", "image", "mask", "label", "source", "width", "height", "phash"} <= \
        set(table.column_names)
    assert pq.ParquetFile(next(out.glob("shard-*-00000.parquet"))).metadata.num_row_groups == 2

    raw_cfg, pk_cfg = make_cfg(tmp_path, synthetic_archive), packed_cfg(tmp_path, out)
    assert is_packed(pk_cfg["data"]) and not is_packed(raw_cfg["data"])
    raw, packed = load_splits(raw_cfg), load_splits(pk_cfg)
    # same ids in the same splits: the packed phash gives the same near-duplicate groups
    assert {k: [r.id for r in v] for k, v in raw.items()} == \
        {k: [r.id for r in v] for k, v in packed.items()}
    # identical decoded pixels, record by record
    for r, p in zip(raw["train"] + raw["val"], packed["train"] + packed["val"]):
        a, b = load_any_record(r, raw_cfg), load_any_record(p, pk_cfg)
        assert a["id"] == b["id"] and a["label"] == b["label"]
        assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["mask"], b["mask"])
    # ...and through the Ray pipelines, including augmentation of a given epoch
    dr, dp = build_datasets(raw_cfg, raw), build_datasets(pk_cfg, packed)
    assert digests(dr["val"]) == digests(dp["val"])
    assert digests(train_epoch_dataset(dr["train"], 3)) == \
        digests(train_epoch_dataset(dp["train"], 3))
    e0, e1 = digests(dp["train"]), digests(dp["train"])     # per-epoch as for raw archives
    assert sum(e0.values()) == len(packed["train"]) and not set(e0) & set(e1)


@pytest.mark.ray
@pytest.mark.parametrize("encoding", ["png", "raw"])
def test_pre_resized_packs_match_resizing_on_read(ray_cluster, synthetic_archive, tmp_path,
                                                  encoding):
    out = tmp_path / f"packed-{encoding}"
    m = pack(tmp_path, synthetic_archive, out, "+pack.resize_to=[40,40]",
             f"+pack.encoding={encoding}", "data.image_size=[40,40]")
    assert m["encoding"] == encoding and m["resize_to"] == [40, 40]
    first = pq.read_table(next(out.glob("shard-*-00000.parquet"))).slice(0, 1).to_pylist()[0]
    assert first["shape"] == [40, 40, 3] and (first["width"], first["height"]) == (64, 64)
    raw_cfg = make_cfg(tmp_path, synthetic_archive, "data.image_size=[40,40]",
                       "data.split.ratios=[1,0,0]")
    pk_cfg = packed_cfg(tmp_path, out, "data.image_size=[40,40]", "data.split.ratios=[1,0,0]")
    dr = build_datasets(raw_cfg, load_splits(raw_cfg))["train"]
    dp = build_datasets(pk_cfg, load_splits(pk_cfg))["train"]
    assert digests(train_epoch_dataset(dr, 1)) == digests(train_epoch_dataset(dp, 1))
    from medseg_core.layouts import LayoutError

    if encoding == "raw":  # raw arrays hold 3 channels: read as 1, every row was dropped
        with pytest.raises(LayoutError, match="raw 3-channel arrays, but data.channels is 1"):
            load_splits(packed_cfg(tmp_path, out, "data.image_size=[40,40]", "data.channels=1"))
    with pytest.warns(UserWarning, match=r"resized to \[40, 40\] and is read at "
                      r"data.image_size=\[32, 32\]"):
        load_splits(packed_cfg(tmp_path, out, "data.image_size=[32,32]"))


def test_pack_leaves_out_bad_files_and_names_them(synthetic_archive, tmp_path):
    arc = tmp_path / "arc"
    shutil.copytree(synthetic_archive, arc)
    (arc / "benign" / "benign (2).png").write_bytes(b"")
    (arc / "normal" / "normal (1)_mask.png").write_bytes(b"GIF89a truncated")
    out = tmp_path / "packed"
    with pytest.warns(UserWarning, match=r"benign \(2\)\.png"):
        m = pack(tmp_path, str(arc), out, backend="local")
    assert m["records"] == 13
    reasons = {Path(s["path"]).name: s["reason"] for s in m["skipped"]}
    assert set(reasons) == {"benign (2).png", "normal (1)_mask.png"}
    assert "empty" in reasons["benign (2).png"]
    # the packed archive's reader reports what the pack left out, too
    cfg = packed_cfg(tmp_path, out)
    with pytest.warns(UserWarning, match="normal"):
        splits = load_splits(cfg)
    assert sum(len(v) for v in splits.values()) == 13
    assert data_report(cfg, warn=False)["by_stage"] == {"pack": 2}
    # the raw archive drops the same two records before splitting (the bad mask included), so
    # both give the same splits
    raw_cfg = make_cfg(tmp_path / "raw", str(arc))
    with pytest.warns(UserWarning, match=r"normal \(1\)_mask\.png"):
        raw = load_splits(raw_cfg)
    assert {k: [r.id for r in v] for k, v in raw.items()} == \
        {k: [r.id for r in v] for k, v in splits.items()}
    assert data_report(raw_cfg, warn=False)["by_stage"] == {"check": 2}
    with pytest.raises(ValueError, match=r"benign \(2\)\.png"):
        pack(tmp_path, str(arc), tmp_path / "strict", "data.strict=true", backend="local")
    assert not (tmp_path / "strict" / "manifest.json").exists()
    # a strict read of the pack that left them out stops too, naming the first one
    with pytest.raises(ValueError, match=r"\.png: .*left out when the archive was packed"):
        load_splits(packed_cfg(tmp_path / "s", out, "data.strict=true"))


@pytest.mark.ray
@pytest.mark.s3
def test_packed_archive_on_s3_is_detected_and_read(ray_cluster, s3, synthetic_archive,
                                                   tmp_path, monkeypatch):
    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.env["AWS_ACCESS_KEY_ID"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.env["AWS_SECRET_ACCESS_KEY"])
    s3.create_bucket("medseg-packs")
    # packed straight to the object store by Ray tasks (credentials from the environment)
    m = pack(tmp_path, synthetic_archive, "s3://medseg-packs/synthetic",
             f"data.endpoint_url={s3.endpoint}", "data.region=us-east-1")
    assert m["records"] == 15
    # layout says busi: the manifest at the URL is detected
    cfg = make_cfg(tmp_path, "s3://medseg-packs/synthetic", "data=busi",
                   f"data.endpoint_url={s3.endpoint}", "data.region=us-east-1")
    assert is_packed(cfg["data"])
    assert read_manifest("s3://medseg-packs/synthetic", {"client_kwargs": {
        "endpoint_url": s3.endpoint}})["records"] == 15
    splits = load_splits(cfg)
    shard, rg, row = parse_packed_uri(splits["train"][0].image_uri)
    assert shard.startswith("s3://medseg-packs/synthetic/shard-") and rg >= 0 and row >= 0
    local_cfg = make_cfg(tmp_path, synthetic_archive)
    local = load_splits(local_cfg)
    assert digests(build_datasets(cfg, splits)["val"]) == \
        digests(build_datasets(local_cfg, local)["val"])

    # the bad-input report beside the pack is written as the pack is (it went to the store the
    # environment names, here none); a clean repack leaves no report of the earlier one
    arc = tmp_path / "arc"
    shutil.copytree(synthetic_archive, arc)
    (arc / "benign" / "benign (2).png").write_bytes(b"")
    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": s3.endpoint})
    options = [f"data.endpoint_url={s3.endpoint}",
               "data.report=s3://medseg-packs/bad/data_report.json"]
    with pytest.warns(UserWarning, match=r"benign \(2\)\.png"):
        assert pack(tmp_path, str(arc), "s3://medseg-packs/bad", *options,
                    backend="local")["records"] == 14
    report = json.loads(fs.cat_file("medseg-packs/bad/data_report.json"))
    assert report["by_stage"] == {"pack": 1}
    (arc / "benign" / "benign (2).png").write_bytes(
        (Path(synthetic_archive) / "benign" / "benign (2).png").read_bytes())
    assert pack(tmp_path, str(arc), "s3://medseg-packs/bad", *options,
                backend="local")["records"] == 15
    fs.invalidate_cache()
    assert not fs.exists("medseg-packs/bad/data_report.json")


def test_pack_command_line(synthetic_archive, tmp_path):
    """The pack command; its bad-input report goes beside the pack (it replaced the report of
    the training run that `output_dir` and `run_name` name)."""
    arc = tmp_path / "arc"
    shutil.copytree(synthetic_archive, arc)
    (arc / "benign" / "benign (2).png").write_bytes(b"")
    out = tmp_path / "cli"
    env = dict(os.environ, PYTHONPATH=str(ROOT_DIR))
    proc = subprocess.run(
        [sys.executable, str(ROOT_DIR / "pipelines" / "pack.py"), f"output_dir={tmp_path}/o",
         f"data.url={arc}", f"pack.out={out}", "pack.backend=local", "pack.shard_size=8"],
        capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "packed 14 records into 2 shard(s)" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["layout"] == "busi" and manifest["records"] == 14
    report = json.loads((out / "data_report.json").read_text())
    assert report["by_stage"] == {"pack": 1} and "benign (2).png" in report["entries"][0]["path"]
    assert not (tmp_path / "o" / "runs").exists()
    assert len(list_archive(make_cfg(tmp_path, synthetic_archive)["data"]).records) == 15


def test_reading_a_pack_under_other_class_names_is_refused(synthetic_archive, tmp_path):
    """The pack's labels index its manifest's class names: under another list (or order) every
    label would silently mean another class."""
    from medseg_core.layouts import LayoutError

    out = tmp_path / "packed"
    assert pack(tmp_path, synthetic_archive, out, backend="local")["class_names"] == \
        ["normal", "benign", "malignant"]
    for names in ("[benign,malignant,normal]", "[normal,benign]", "[a,b,c]"):
        with pytest.raises(LayoutError, match=r"data.class_names=\["):
            load_splits(packed_cfg(tmp_path, out, f"data.class_names={names}"))
    same = load_splits(packed_cfg(tmp_path, out))
    unnamed = load_splits(packed_cfg(tmp_path, out, "data.class_names=[]"))
    ids = {k: [r.id for r in v] for k, v in same.items()}
    assert ids == {k: [r.id for r in v] for k, v in unnamed.items()}
    # a segmentation-only pack (no class names) fits only a reader without class names
    manifest_file = out / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest_file.write_text(json.dumps({**manifest, "class_names": []}))
    with pytest.raises(LayoutError, match=r"class_names \[\], but data.class_names is"):
        load_splits(packed_cfg(tmp_path, out))
    seg_only = load_splits(packed_cfg(tmp_path, out, "data.class_names=[]"))
    assert {k: [r.id for r in v] for k, v in seg_only.items()} == ids


def test_in_process_trainer_reads_packed_archives(synthetic_archive, tmp_path, capsys):
    """trainer=local reads a packed archive through the same decoding as the Ray pipeline."""
    import csv

    from pipelines.train import run

    out = tmp_path / "packed-local"
    pack(tmp_path, synthetic_archive, out, backend="local")
    tiny = ["trainer=local", "train.epochs=1", "stages=[segmenter]", "model=improved_unet",
            "model.widths=[8,16]", "train.batch_size=4"]
    cfg = packed_cfg(tmp_path, out, *tiny)
    splits = load_splits(cfg)
    bundles = run(cfg)
    assert "images): Dice" in capsys.readouterr().out  # the originals: at their own size
    # a pre-resized pack's closing Dice is at the pack's size, and says so
    small = tmp_path / "packed-32"
    pack(tmp_path, synthetic_archive, small, "+pack.resize_to=[32,32]", "+pack.encoding=png",
         backend="local")
    run(packed_cfg(tmp_path, small, *tiny, "run_name=small"))
    assert "images, at the pack's 32x32, not the images' original size): Dice" in \
        capsys.readouterr().out
    assert (Path(bundles["segmenter"]) / "version").exists()
    with open(tmp_path / "out" / "runs" / "t" / "segmenter" / "metrics.csv") as f:
        row = list(csv.DictReader(f))[-1]
    # every training record was read (drop_last: whole batches) and every validation record
    assert int(float(row["train_samples"])) == len(splits["train"]) // 4 * 4
    assert int(float(row["val_images"])) == len(splits["val"])
    assert 0.0 <= float(row["val_dice"]) <= 1.0


def test_packing_thresholds_masks_as_reading_does_and_replaces_the_manifest_last(
        synthetic_archive, tmp_path):
    from medseg_core.io import encode_png
    from medseg_core.transforms import Resize

    arc = tmp_path / "arc"
    shutil.copytree(synthetic_archive, arc)
    rid = "malignant/malignant (1)"
    raw_cfg = make_cfg(tmp_path, str(arc), "data.mask_threshold=0")
    raw = {r.id: r for r in list_archive(raw_cfg["data"]).records}
    mask = load_any_record(raw[rid], raw_cfg)["mask"]
    assert mask.any()
    # the same mask stored as 0/1 values: foreground only with data.mask_threshold=0
    (arc / "malignant" / "malignant (1)_mask.png").write_bytes(encode_png(mask))
    out = tmp_path / "packed"
    out.mkdir()
    # a pack that fails over an older one leaves no manifest describing half-rewritten shards
    (out / "manifest.json").write_text('{"stale": true}')
    (arc / "benign" / "benign (2).png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"benign \(2\)\.png"):
        pack(tmp_path, str(arc), out, "data.strict=true", backend="local")
    assert not (out / "manifest.json").exists()
    shutil.copy(Path(synthetic_archive) / "benign" / "benign (2).png", arc / "benign")
    m = pack(tmp_path, str(arc), out, "data.mask_threshold=0", "+pack.resize_to=[32,32]",
             "+pack.encoding=png", backend="local")
    assert m["mask_threshold"] == 0
    assert json.loads((out / "manifest.json").read_text())["records"] == 15
    cfg = packed_cfg(tmp_path, out, "data.mask_threshold=0")
    packed = {r.id: r for split in load_splits(cfg).values() for r in split}
    got = load_any_record(packed[rid], cfg)["mask"]
    want = Resize([32, 32])(load_any_record(raw[rid], raw_cfg))["mask"]
    assert got.any() and np.array_equal(got, want)
    # the original files (encoding file) keep a single mask file's 0/1 values: read at another
    # threshold they would be empty masks, so that reading is refused
    from medseg_core.layouts import LayoutError

    files = tmp_path / "packed_files"
    assert pack(tmp_path, str(arc), files, "data.mask_threshold=0",
                backend="local")["mask_threshold"] == 0
    with pytest.raises(LayoutError, match=r"masks were read at data.mask_threshold=0, but it is "
                                          r"127 here: set data.mask_threshold=0"):
        load_splits(packed_cfg(tmp_path, files))
    cfg = packed_cfg(tmp_path, files, "data.mask_threshold=0")
    packed = {r.id: r for split in load_splits(cfg).values() for r in split}
    assert np.array_equal(load_any_record(packed[rid], cfg)["mask"], mask)


def test_a_repack_replaces_every_shard_and_reads_back_its_own_records(synthetic_archive,
                                                                      tmp_path):
    from pipelines.data import list_packed

    out = tmp_path / "packed"
    first = pack(tmp_path, synthetic_archive, out, backend="local")  # 3 shards of <= 6
    cfg = packed_cfg(tmp_path / "a", out)
    old = {r.id: r for r in list_packed(str(out), None, True)[0]}
    for r in old.values():
        load_any_record(r, cfg)  # the in-process row-group cache now holds the old pack
    second = pack(tmp_path, synthetic_archive, out, "++pack.shard_size=100", backend="local")
    assert len(first["shards"]) == 3 and len(second["shards"]) == 1
    # the old pack's shards are gone: a Parquet reader of the folder sees each record once
    assert sorted(p.name for p in out.glob("shard-*")) == [second["shards"][0]["path"]]
    assert pq.read_table(sorted(map(str, out.glob("shard-*")))).num_rows == 15
    # each new record decodes to its own image, not the row the cache held for the old pack
    raw_cfg = make_cfg(tmp_path / "b", synthetic_archive)
    raw = {r.id: r for r in list_archive(raw_cfg["data"]).records}
    for r in list_packed(str(out), None, True)[0]:
        assert np.array_equal(load_any_record(r, cfg)["image"],
                              load_any_record(raw[r.id], raw_cfg)["image"]), r.id


@pytest.mark.parametrize("bad,message", [
    ("pack.shard_size=0", "pack.shard_size must be a whole number >= 1"),
    ("pack.shard_size=abc", "pack.shard_size must be a whole number"),
    ("pack.row_group_rows=-1", "pack.row_group_rows must be a whole number >= 1"),
    # these were refused only while encoding, after the old manifest was gone
    ("pack.resize_to=[0,64]", "resize_to must be"), ("pack.compress_level=42", "compress_level"),
    ("pack.backend=dask", "pack.backend must be"),
    # data settings: channels failed in the encoding tasks after the manifest was gone, and
    # max_bytes=0 packed an empty archive over the good one
    ("data.channels=2", "data.channels must be 1"), ("data.max_bytes=0", "data.max_bytes must"),
    ("data.mask_threshold=300", "data.mask_threshold must")])
def test_bad_pack_settings_are_refused_and_keep_the_old_pack(tmp_path, synthetic_archive, bad,
                                                              message):
    out = tmp_path / "packed"
    pack(tmp_path, synthetic_archive, out, backend="local")
    before = (out / "manifest.json").read_bytes()
    shards = sorted(p.name for p in out.glob("shard-*"))
    with pytest.raises(ValueError, match=message):
        if bad.startswith("pack.backend="):
            pack(tmp_path, synthetic_archive, out, backend=bad.split("=", 1)[1])
        else:
            pack(tmp_path, synthetic_archive, out,
                 bad.replace("pack.", "++pack.") if bad.startswith("pack.") else bad,
                 backend="local")
    assert (out / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in out.glob("shard-*")) == shards


def test_resize_to_without_an_encoding_packs_png_and_with_file_is_refused(tmp_path,
                                                                         synthetic_archive):
    """pack.encoding=file with pack.resize_to was packed as PNG without a word: the original
    bytes cannot be resized, so it is refused; left unset, resize_to packs PNG."""
    with pytest.raises(ValueError, match="pack.encoding=file stores the original bytes"):
        pack(tmp_path, synthetic_archive, tmp_path / "f", "++pack.encoding=file",
             "++pack.resize_to=[32,32]", backend="local")
    assert not (tmp_path / "f").exists()
    assert pack(tmp_path, synthetic_archive, tmp_path / "p", "++pack.resize_to=[32,32]",
                backend="local")["encoding"] == "png"


def test_a_missing_archive_or_a_layout_matching_nothing_is_refused_before_packing(tmp_path):
    """`data.url=/nonexistent` crashed naming pack.out's manifest.json: the input's URL and the
    reason are named, before pack.out is created or an old pack's manifest removed."""
    from medseg_core.io import encode_png
    from medseg_core.layouts import LayoutError

    plain = tmp_path / "plain"
    plain.mkdir()
    for i in range(2):
        (plain / f"img{i}.png").write_bytes(encode_png(np.zeros((8, 8, 3), np.uint8)))
    missing = str(tmp_path / "nothing")
    old = tmp_path / "old"
    old.mkdir()
    (old / "manifest.json").write_text("an older pack")
    for url, message in ((missing, f"{missing}: the archive does not exist"),
                         (str(plain), f"{plain}: layout 'busi' found no record among the 2 file")):
        for out in (tmp_path / "new", old):
            with pytest.raises(LayoutError, match=message):
                pack(tmp_path, url, out, "data=busi", backend="local")
            assert not (tmp_path / "new").exists()
            assert (old / "manifest.json").read_text() == "an older pack"


def corrupt_footer(whole: bytes) -> bytes:
    """The shard with its footer's metadata overwritten (pyarrow raises a bare OSError)."""
    start = len(whole) - 8 - int.from_bytes(whole[-8:-4], "little")
    return whole[:start] + b"\xff" * 8 + whole[start + 8:]


@pytest.mark.ray
@pytest.mark.parametrize("damage", ["truncated", "corrupt-footer"])
def test_an_unreadable_shard_is_reported_record_by_record(ray_cluster, synthetic_archive,
                                                           tmp_path, damage):
    from medseg_core.layouts import LayoutError

    out = tmp_path / "packed"
    pack(tmp_path, synthetic_archive, out, backend="local")  # shards of 6 rows: [4, 2] groups
    shard = next(out.glob("shard-*-00001.parquet"))
    whole = shard.read_bytes()
    # an interrupted copy, or bit rot in the footer
    cut = whole[: len(whole) // 2] if damage == "truncated" else corrupt_footer(whole)
    # found while listing: its 6 records are left out, each reported; strict stops, naming it
    shard.write_bytes(cut)
    cfg = packed_cfg(tmp_path / "a", out)
    with pytest.warns(UserWarning, match=shard.name):
        splits = load_splits(cfg)
    assert sum(len(v) for v in splits.values()) == 9
    rep = data_report(cfg, warn=False)
    assert rep["dropped"] == 6 and rep["by_stage"] == {"listing": 6}
    with pytest.raises(ValueError, match=rf"{shard.name}.*strict"):
        load_splits(packed_cfg(tmp_path / "b", out, "data.strict=true"))
    # truncated after listing: the Ray read tasks drop and report each of its rows, and an
    # in-process read names the shard
    shard.write_bytes(whole)
    cfg = packed_cfg(tmp_path / "c", out, "data.split.ratios=[1.0,0.0,0.0]")
    records = load_splits(cfg)["train"]
    shard.write_bytes(cut)
    ds = build_datasets(cfg, {"train": records})["train"]
    assert sum(len(b["label"]) for b in ds.iter_batches(batch_size=8)) == 9
    rep = data_report(cfg, warn=False)
    assert rep["dropped"] == 6 and rep["by_stage"] == {"decode": 6}
    lost = next(r for r in records if shard.name in r.image_uri)
    with pytest.raises(LayoutError, match=rf"{shard.stem}\.parquet: row group \d unreadable"):
        load_any_record(lost, cfg)
    # removed after listing (a repack into the same folder): said so, not the bare path
    shard.unlink()
    with pytest.raises(LayoutError, match=rf"{shard.stem}\.parquet: shard not found: the pack "
                                          "was rewritten or removed since it was listed"):
        load_any_record(lost, cfg)


def test_only_pyarrows_verdict_on_the_bytes_counts_as_a_corrupt_shard():
    """A corrupt shard is bad input (dropped and reported); a failing store is not, and raises:
    s3fs and the OS give their errors a type or an errno, pyarrow's parse errors have neither."""
    import errno

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.data import corrupt_parquet

    buf = pa.BufferOutputStream()
    pq.write_table(pa.table({"id": ["a", "b"]}), buf)
    with pytest.raises(OSError) as parse_error:
        pq.read_table(pa.BufferReader(corrupt_footer(buf.getvalue().to_pybytes())))
    assert corrupt_parquet(parse_error.value)
    assert corrupt_parquet(pa.ArrowInvalid("Parquet magic bytes not found"))
    assert not corrupt_parquet(OSError(errno.EIO, "s3: service unavailable"))
    assert not corrupt_parquet(PermissionError("Access Denied"))
    assert not corrupt_parquet(ConnectionResetError(errno.ECONNRESET, "reset by peer"))


def test_a_raw_row_of_the_wrong_size_is_bad_input_named_by_its_source():
    from medseg_core.layouts import LayoutError
    from pipelines.data import decode_packed_row

    row = {"id": "a", "label": 0, "source": "/arc/a.png", "encoding": "raw", "shape": [4, 4, 3],
           "image": bytes(4 * 4 * 3), "mask": bytes(16)}
    assert decode_packed_row(row)["image"].shape == (4, 4, 3)
    for key, size in (("image", 47), ("mask", 15)):
        with pytest.raises(LayoutError, match=f"/arc/a.png: packed raw {key} has {size} bytes"):
            decode_packed_row({**row, key: bytes(size)})


def test_a_packed_raw_row_over_the_pixel_limit_is_refused_before_it_is_decoded(tmp_path):
    """A raw row declares its shape: one of 7000x7000 compresses to a few kB and decoded to
    196 MB, over data.max_pixels, which only encoded images were held to."""
    from medseg_core.io import ImageTooLargeError
    from pipelines.data import decode_packed_row

    row = {"id": "a", "label": 0, "source": "/arc/a.png", "encoding": "raw",
           "shape": [40, 50, 3], "image": bytes(40 * 50 * 3), "mask": bytes(40 * 50)}
    assert decode_packed_row(row, max_pixels=2000)["image"].shape == (40, 50, 3)
    with pytest.raises(ImageTooLargeError, match=r"/arc/a.png: packed raw image is 50x40 = "
                                                 r"2000 pixels, over the limit of 1999"):
        decode_packed_row(row, max_pixels=1999)


def test_a_packed_row_group_over_its_byte_budget_is_refused_unread(synthetic_archive,
                                                                    tmp_path):
    """Reading a row group decompressed all of it, however large its rows: a crafted shard of a
    few kB held hundreds of MB. Its footer gives the uncompressed size, checked first."""
    import pyarrow as pa

    from medseg_core.io import ImageTooLargeError
    from pipelines.data import list_packed

    out = tmp_path / "packed"
    pack(tmp_path, synthetic_archive, out, "+pack.resize_to=[16,16]", "+pack.encoding=raw",
         backend="local")
    [shard] = [f for f in out.iterdir() if f.suffix == ".parquet"][:1]
    rows = pq.read_table(shard).to_pylist()
    big = 300  # 300x300x3 + 300x300 bytes of zeros: 360 kB, a few hundred bytes compressed
    rows[0].update(image=bytes(big * big * 3), mask=bytes(big * big), shape=[big, big, 3])
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(shard)), shard,
                   compression="zstd", row_group_size=1)
    assert shard.stat().st_size < 50_000
    cfg = packed_cfg(tmp_path, out, "data.max_pixels=50000", "data.max_bytes=100000")
    record = next(r for r in list_packed(str(out))[0] if r.id == rows[0]["id"])
    with pytest.raises(ImageTooLargeError, match=r"row group 0 holds \d+ bytes uncompressed "
                                                 r"for 1 row\(s\), over the limit of 265536"):
        load_any_record(record, cfg)
    # within the budget the row is read, and then refused by its pixels
    with pytest.raises(ImageTooLargeError, match="packed raw image is 300x300 = 90000 pixels"):
        load_any_record(record, packed_cfg(tmp_path, out, "data.max_pixels=80000",
                                           "data.max_bytes=200000"))
    # listing reads a row group's masks only where some of its rows have one and others not:
    # held to the mask's budget (such a group was decompressed whole)
    rows[0].update(mask=bytes(600 * 600), image=bytes(600 * 600 * 3), shape=[600, 600, 3])
    rows[1]["mask"] = None
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(shard)), shard,
                   compression="zstd", row_group_size=2)
    with pytest.warns(UserWarning, match="dropped"):
        load_splits(cfg)
    reasons = [e["reason"] for e in data_report(cfg, warn=False)["entries"]]
    assert any("row group 0 declares" in r and "in mask for 2 row(s)" in r for r in reasons)
