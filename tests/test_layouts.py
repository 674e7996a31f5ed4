"""medseg_core.layouts: every layout on small trees, error cases, fsspec URLs, shared datasets."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from medseg_core.io import ImageDecodeError
from medseg_core.layouts import (
    CLASS_NAMES,
    LAYOUTS,
    LayoutError,
    Listing,
    Record,
    Skipped,
    list_records,
    load_record,
    valid_text,
)

RNG = np.random.default_rng(1)


def png(
    path: Path | str,
    size: tuple[int, int] = (8, 6),
    *,
    mask: np.ndarray | None = None,
    mode: str = "L",
) -> np.ndarray:
    """Write a PNG (random grey/RGB image, or the given 0/1 mask as 0/255) and return its array."""
    w, h = size
    if mask is not None:
        arr = mask.astype(np.uint8) * 255
    elif mode == "RGB":
        arr = RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)
    else:
        arr = RNG.integers(0, 256, (h, w), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    if isinstance(path, Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buf.getvalue())
    else:
        fs, fpath = fsspec.core.url_to_fs(path)
        fs.pipe_file(fpath, buf.getvalue())
    return arr


def rand_mask(size: tuple[int, int] = (8, 6)) -> np.ndarray:
    w, h = size
    return RNG.random((h, w)) > 0.5


def busi_tree(root: Path) -> dict[str, np.ndarray]:
    """benign/a (two masks), malignant/b (one mask, RGB image), normal/c (empty mask)."""
    m1, m2, mb = rand_mask(), rand_mask(), rand_mask()
    png(root / "benign" / "a.png")
    png(root / "benign" / "a_mask.png", mask=m1)
    png(root / "benign" / "a_mask_1.png", mask=m2)
    png(root / "malignant" / "b.png", mode="RGB")
    png(root / "malignant" / "b_mask.png", mask=mb)
    png(root / "normal" / "c.png")
    png(root / "normal" / "c_mask.png", mask=np.zeros((6, 8), bool))
    (root / "README.txt").write_text("not an image")
    (root / "benign" / ".DS_Store").write_bytes(b"junk")
    return {"benign/a": m1 | m2, "malignant/b": mb, "normal/c": np.zeros((6, 8), bool)}


# ----------------------------------------------------------------------------------------------
# Record basics


def test_record_dict_round_trip():
    rec = Record("x/y", "s3://b/x/y.png", ("s3://b/x/y_mask.png",), 2)
    d = rec.to_dict()
    assert d == {
        "id": "x/y",
        "image_uri": "s3://b/x/y.png",
        "mask_uris": ["s3://b/x/y_mask.png"],
        "label": 2,
    }
    assert Record.from_dict(d) == rec
    assert Record("a", "a.png").label == -1
    assert set(LAYOUTS) == {"busi", "isic2018", "dsb2018", "folder", "images"}
    assert CLASS_NAMES == ("normal", "benign", "malignant")


def test_unknown_layout():
    with pytest.raises(ValueError, match="unknown layout"):
        list_records("/tmp", "nope")


# ----------------------------------------------------------------------------------------------
# BUSI


def test_busi(tmp_path):
    truth = busi_tree(tmp_path)
    listing = list_records(str(tmp_path), "busi", check_sizes=True)
    assert isinstance(listing, Listing)
    assert [r.id for r in listing.records] == ["benign/a", "malignant/b", "normal/c"]
    assert [r.label for r in listing.records] == [1, 2, 0]
    assert listing.class_names == CLASS_NAMES
    assert listing.skipped == []
    a = listing.records[0]
    assert a.image_uri == str(tmp_path / "benign" / "a.png")
    assert [Path(u).name for u in a.mask_uris] == ["a_mask.png", "a_mask_1.png"]
    for rec in listing.records:
        sample = load_record(rec)
        assert sample["id"] == rec.id and sample["label"] == rec.label
        assert sample["image"].shape == (6, 8, 3) and sample["image"].dtype == np.uint8
        assert sample["mask"].dtype == np.uint8
        np.testing.assert_array_equal(sample["mask"], truth[rec.id].astype(np.uint8))
    assert load_record(a, channels=1)["image"].shape == (6, 8, 1)
    # dict records (Ray Data rows) load the same way
    np.testing.assert_array_equal(load_record(a.to_dict())["mask"], load_record(a)["mask"])


def test_symlinked_class_folders_are_listed_and_a_link_loop_once(tmp_path):
    """Archives are often assembled from links to class folders: fsspec's local `find` skips
    a symlinked folder without a word, which left those classes out of training."""
    busi_tree(tmp_path / "real")
    arc = tmp_path / "arc"
    arc.mkdir()
    for cls in ("benign", "malignant"):
        (arc / cls).symlink_to(tmp_path / "real" / cls, target_is_directory=True)
    shutil.copytree(tmp_path / "real" / "normal", arc / "normal")
    (arc / "normal" / "loop").symlink_to(arc, target_is_directory=True)  # back to the root
    listing = list_records(str(arc), "busi", strict=True)
    assert [r.id for r in listing.records] == ["benign/a", "malignant/b", "normal/c"]
    assert listing.records[0].image_uri == str(arc / "benign" / "a.png")
    assert load_record(listing.records[0])["mask"].any()


def test_a_folder_that_cannot_be_listed_fails_the_listing_naming_it(tmp_path, monkeypatch):
    """`os.walk` skips a folder it may not list unless told otherwise: a class folder without
    read permission left its whole class out of training, even with strict=true. The denial
    is simulated in `os.scandir` (what `os.walk` lists with): root reads any folder."""
    import os

    busi_tree(tmp_path)
    denied = str(tmp_path / "malignant")
    scandir = os.scandir

    def guarded(path="."):
        if os.fspath(path) == denied:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", guarded)
    for strict in (True, False):
        with pytest.raises(PermissionError, match="cannot be listed is not skipped") as caught:
            list_records(str(tmp_path), "busi", strict=strict)
        assert caught.value.filename == denied
    monkeypatch.setattr(os, "scandir", scandir)
    assert len(list_records(str(tmp_path), "busi").records) == 3


def test_an_archive_folder_named_with_a_double_colon_and_nas_junk_folders(tmp_path):
    """fsspec reads '::' in a URL as a chain of filesystems: an archive in `scans::2026` was
    "the archive does not exist". Synology's @eaDir thumbnails and recycle bins are no data."""
    arc = tmp_path / "scans::2026"
    busi_tree(arc)
    for junk in ("@eaDir/a.png", "#recycle/benign/old.png", "$RECYCLE.BIN/x.png"):
        png(arc / "benign" / junk)
    png(arc / "normal" / "two\nlines.png")  # a mask's name is matched across the newline
    png(arc / "normal" / "two\nlines_mask.png", mask=rand_mask())
    listing = list_records(str(arc), "busi", strict=True)
    assert [r.id for r in listing.records] == ["benign/a", "malignant/b", "normal/c",
                                               "normal/two\nlines"]
    assert listing.records[0].image_uri == str(arc / "benign" / "a.png")
    assert load_record(listing.records[0])["mask"].any()


def test_busi_class_names_option(tmp_path):
    busi_tree(tmp_path)
    listing = list_records(str(tmp_path), "busi", class_names=None)
    assert listing.class_names == ("benign", "malignant", "normal")
    assert [r.label for r in listing.records] == [0, 1, 2]
    with pytest.raises(LayoutError, match=re.escape(str(tmp_path / "normal" / "c.png"))):
        list_records(str(tmp_path), "busi", class_names=("benign", "malignant"))
    partial = list_records(str(tmp_path), "busi", class_names=("benign", "malignant"), strict=False)
    assert [r.id for r in partial.records] == ["benign/a", "malignant/b"]
    assert "class" in partial.skipped[0].reason


def test_busi_missing_mask(tmp_path):
    busi_tree(tmp_path)
    png(tmp_path / "benign" / "lonely.png")
    lonely = str(tmp_path / "benign" / "lonely.png")
    with pytest.raises(LayoutError, match=re.escape(lonely)):
        list_records(str(tmp_path), "busi")
    listing = list_records(str(tmp_path), "busi", strict=False)
    assert len(listing.records) == 3
    assert listing.skipped == [Skipped(lonely, "no mask (expected 'lonely_mask.png')")]
    unlabelled = list_records(str(tmp_path), "busi", require_masks=False)
    assert [r.mask_uris for r in unlabelled.records if r.id == "benign/lonely"] == [()]


def test_busi_orphan_mask(tmp_path):
    busi_tree(tmp_path)
    png(tmp_path / "malignant" / "ghost_mask.png", mask=rand_mask())
    ghost = str(tmp_path / "malignant" / "ghost_mask.png")
    with pytest.raises(LayoutError, match=re.escape(ghost) + ".*without image"):
        list_records(str(tmp_path), "busi")
    listing = list_records(str(tmp_path), "busi", strict=False)
    assert [s.path for s in listing.skipped] == [ghost]
    assert len(listing.records) == 3


def test_busi_duplicate_id(tmp_path):
    busi_tree(tmp_path)
    Image.fromarray(np.zeros((6, 8), np.uint8)).save(tmp_path / "benign" / "a.jpg")
    with pytest.raises(LayoutError, match="duplicate id 'benign/a'"):
        list_records(str(tmp_path), "busi")
    listing = list_records(str(tmp_path), "busi", strict=False)
    assert [r.id for r in listing.records] == ["benign/a", "malignant/b", "normal/c"]
    assert len(listing.skipped) == 1 and "duplicate" in listing.skipped[0].reason


def test_size_mismatch(tmp_path):
    busi_tree(tmp_path)
    bad = tmp_path / "malignant" / "b_mask.png"
    png(bad, mask=rand_mask((9, 6)))
    # Without check_sizes the listing passes; loading catches it.
    rec = next(r for r in list_records(str(tmp_path), "busi").records if r.id == "malignant/b")
    with pytest.raises(LayoutError, match=re.escape(str(bad)) + ".*9x6.*8x6"):
        load_record(rec)
    with pytest.raises(LayoutError, match=re.escape(str(bad))):
        list_records(str(tmp_path), "busi", check_sizes=True)
    listing = list_records(str(tmp_path), "busi", check_sizes=True, strict=False)
    assert [r.id for r in listing.records] == ["benign/a", "normal/c"]
    assert listing.skipped[0].path == str(bad) and "9x6" in listing.skipped[0].reason


def test_problems_all_reported_when_not_strict(tmp_path):
    busi_tree(tmp_path)
    png(tmp_path / "benign" / "lonely.png")
    png(tmp_path / "normal" / "ghost_mask.png", mask=rand_mask())
    with pytest.raises(LayoutError, match=r"and 1 more problem"):
        list_records(str(tmp_path), "busi")
    assert len(list_records(str(tmp_path), "busi", strict=False).skipped) == 2


def test_corrupt_image_names_file_on_load(tmp_path):
    busi_tree(tmp_path)
    (tmp_path / "benign" / "a.png").write_bytes(b"")
    rec = list_records(str(tmp_path), "busi").records[0]
    with pytest.raises(ImageDecodeError, match=re.escape(rec.image_uri)):
        load_record(rec)
    with pytest.raises(LayoutError, match="unreadable header"):
        list_records(str(tmp_path), "busi", check_sizes=True)


def test_missing_archive(tmp_path):
    """A mistyped URL was a listing of 0 records and one 'skipped' file when not strict (a
    training run then failed on an empty split, a bulk job succeeded): it raises naming the URL,
    whatever `strict` and `allow_empty`."""
    nowhere = str(tmp_path / "nowhere")
    for strict in (True, False):
        for allow_empty in (True, False):
            with pytest.raises(LayoutError, match=re.escape(nowhere) + ": the archive does not "
                               "exist"):
                list_records(nowhere, "busi", strict=strict, allow_empty=allow_empty)
    png(tmp_path / "a.png")
    with pytest.raises(LayoutError, match="a.png: the archive is a file"):
        list_records(str(tmp_path / "a.png"), "images", allow_empty=True)


def test_a_layout_that_matches_no_file_is_an_error_naming_it(tmp_path):
    """Plain images listed as BUSI (or DSB 2018) gave 0 records and every file skipped (or
    none): a wrong `layout` raises naming the URL, the layout and the files seen and skipped,
    strict or not. An existing empty folder lists empty only with allow_empty."""
    for i in range(3):
        png(tmp_path / "in" / f"img{i}.png")
    url = str(tmp_path / "in")
    for strict in (True, False):
        with pytest.raises(LayoutError, match=re.escape(url) + r": layout 'busi' found no record "
                           r"among the 3 file\(s\) found, 3 skipped by the layout \(first: .*"
                           r"img0.png: image is not inside a class folder\); check `layout`"):
            list_records(url, "busi", strict=strict, allow_empty=True)
        with pytest.raises(LayoutError, match=r"layout 'dsb2018' found no record among the 3 "
                           r"file\(s\) found, 0 skipped"):
            list_records(url, "dsb2018", strict=strict)
    assert len(list_records(url, "images").records) == 3
    # layouts that look only in their own folders found none of these files: a wrong layout
    # or option, not an empty archive (the bulk job reported it empty and ended with 0 images)
    for layout, options in (("isic2018", {}), ("folder", {"image_dir": "imgs"}),
                            ("images", {"recursive": False})):
        root = url if layout != "images" else str(tmp_path)  # its files one folder down
        with pytest.raises(LayoutError, match=rf"layout '{layout}' found no record among the 3 "
                           r"file\(s\) found, 0 skipped"):
            list_records(root, layout, allow_empty=True, **options)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".DS_Store").write_bytes(b"x")  # hidden: not a file of the archive
    listing = list_records(str(tmp_path / "empty"), "images", strict=False, allow_empty=True)
    assert listing.records == [] and listing.skipped == []
    with pytest.raises(LayoutError, match="no files found for layout 'images'"):
        list_records(str(tmp_path / "empty"), "images", strict=False)


# ----------------------------------------------------------------------------------------------
# URLs: file://, memory:// (and listing once)


def test_file_url_keeps_protocol(tmp_path):
    busi_tree(tmp_path)
    listing = list_records(tmp_path.as_uri(), "busi")
    assert all(r.image_uri.startswith("file://") for r in listing.records)
    assert all(u.startswith("file://") for r in listing.records for u in r.mask_uris)
    assert [r.id for r in listing.records] == ["benign/a", "malignant/b", "normal/c"]
    assert load_record(listing.records[0])["mask"].any()


def test_memory_url_lists_once_and_loads(monkeypatch):
    fs = fsspec.filesystem("memory")
    root = "memory://medseg-test-layouts/busi"
    if fs.exists("/medseg-test-layouts"):
        fs.rm("/medseg-test-layouts", recursive=True)
    masks = {}
    for cls in ("benign", "normal"):
        for i in range(3):
            png(f"{root}/{cls}/{cls} ({i}).png")
            m = rand_mask() if cls == "benign" else np.zeros((6, 8), bool)
            png(f"{root}/{cls}/{cls} ({i})_mask.png", mask=m)
            masks[f"{cls}/{cls} ({i})"] = m

    calls = Counter()
    cls = type(fs)
    for name in ("find", "ls", "open", "cat_file", "info", "exists"):
        orig = getattr(cls, name)

        def wrapped(self, *a, _orig=orig, _name=name, **k):
            calls[_name] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(cls, name, wrapped)
    listing = list_records(root, "busi")
    assert calls["find"] == 1
    assert calls["open"] == 0 and calls["cat_file"] == 0 and calls["info"] == 0
    monkeypatch.undo()

    assert len(listing.records) == 6
    for rec in listing.records:
        assert rec.image_uri.startswith("memory://")
        assert rec.mask_uris[0].startswith("memory://")
        sample = load_record(rec)
        np.testing.assert_array_equal(sample["mask"], masks[rec.id].astype(np.uint8))
    # header-only size checks also work through the URL
    assert len(list_records(root, "busi", check_sizes=True).records) == 6
    fs.rm("/medseg-test-layouts", recursive=True)


@pytest.mark.s3
def test_s3_listing_yields_s3_uris(s3, tmp_path):
    truth = busi_tree(tmp_path / "local")
    s3.upload_dir(tmp_path / "local", "s3://medseg-layouts/busi")
    listing = list_records(
        "s3://medseg-layouts/busi", "busi", storage_options=s3.storage_options, check_sizes=True
    )
    assert [r.id for r in listing.records] == ["benign/a", "malignant/b", "normal/c"]
    assert all(r.image_uri.startswith("s3://medseg-layouts/busi/") for r in listing.records)
    for rec in listing.records:
        sample = load_record(rec, storage_options=s3.storage_options)
        np.testing.assert_array_equal(sample["mask"], truth[rec.id].astype(np.uint8))
    # a prefix with no object under it is an archive that does not exist
    with pytest.raises(LayoutError, match="s3://medseg-layouts/bsui: the archive does not exist"):
        list_records("s3://medseg-layouts/bsui", "busi", storage_options=s3.storage_options,
                     strict=False, allow_empty=True)
    # folder markers (the zero-byte "name/" objects an S3 console makes) are not files: a
    # marker alone is an empty folder, as locally, not a file that matches no layout
    client = s3.client()
    for key in ("busi/", "busi/benign/", "incoming/"):
        client.put_object(Bucket="medseg-layouts", Key=key, Body=b"")
    marked = list_records("s3://medseg-layouts/busi", "busi", storage_options=s3.storage_options,
                          strict=True)
    assert [r.id for r in marked.records] == ["benign/a", "malignant/b", "normal/c"]
    (tmp_path / "incoming").mkdir()
    for url in ("s3://medseg-layouts/incoming", str(tmp_path / "incoming")):
        empty = list_records(url, "images", storage_options=s3.storage_options, strict=True,
                             allow_empty=True)
        assert empty.records == [] and empty.skipped == []


# ----------------------------------------------------------------------------------------------
# ISIC 2018


def isic_tree(root: Path, csv: bool = True) -> dict[str, np.ndarray]:
    truth = {}
    (root / "in").mkdir(parents=True, exist_ok=True)
    for i in (24306, 24307, 24308):
        m = rand_mask()
        rgb = RNG.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(root / "in" / f"ISIC_{i:07d}.jpg")
        png(root / "gt" / f"ISIC_{i:07d}_segmentation.png", mask=m)
        truth[f"ISIC_{i:07d}"] = m
    png(root / "in" / "ISIC_0024306_superpixels.png")  # old releases ship these; ignored
    (root / "in" / "LICENSE.txt").write_text("CC")
    if csv:
        (root / "labels.csv").write_text(
            "image,MEL,NV,BCC,AKIEC,BKL,DF,VASC\n"
            "ISIC_0024306,0.0,1.0,0.0,0.0,0.0,0.0,0.0\n"
            "ISIC_0024307,1.0,0.0,0.0,0.0,0.0,0.0,0.0\n"
            "ISIC_0099999,0.0,0.0,0.0,0.0,0.0,0.0,1.0\n"
        )
    return truth


def test_isic2018(tmp_path):
    truth = isic_tree(tmp_path)
    listing = list_records(
        str(tmp_path),
        "isic2018",
        image_dir="in",
        mask_dir="gt",
        labels_csv="labels.csv",
        check_sizes=True,
    )
    assert [r.id for r in listing.records] == ["ISIC_0024306", "ISIC_0024307", "ISIC_0024308"]
    assert listing.class_names == ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
    assert [r.label for r in listing.records] == [1, 0, -1]  # not in the CSV -> unknown
    for rec in listing.records:
        assert rec.image_uri.endswith(".jpg")
        np.testing.assert_array_equal(load_record(rec)["mask"], truth[rec.id].astype(np.uint8))
    no_csv = list_records(str(tmp_path), "isic2018", image_dir="in", mask_dir="gt")
    assert [r.label for r in no_csv.records] == [-1, -1, -1]


def test_isic2018_default_dirs_and_errors(tmp_path):
    isic_tree(tmp_path, csv=False)
    (tmp_path / "in").rename(tmp_path / "ISIC2018_Task1-2_Training_Input")
    (tmp_path / "gt").rename(tmp_path / "ISIC2018_Task1_Training_GroundTruth")
    assert len(list_records(str(tmp_path), "isic2018").records) == 3
    gone = tmp_path / "ISIC2018_Task1_Training_GroundTruth" / "ISIC_0024307_segmentation.png"
    gone.unlink()
    with pytest.raises(LayoutError, match="ISIC_0024307.jpg.*no mask"):
        list_records(str(tmp_path), "isic2018")
    png(
        tmp_path / "ISIC2018_Task1_Training_GroundTruth" / "ISIC_0000001_segmentation.png",
        mask=rand_mask(),
    )
    listing = list_records(str(tmp_path), "isic2018", strict=False)
    reasons = sorted(s.reason.split(" (")[0] for s in listing.skipped)
    assert reasons == ["mask without image", "no mask"]


# ----------------------------------------------------------------------------------------------
# DSB 2018


def test_dsb2018(tmp_path):
    truth = {}
    for key in ("b2", "a1"):
        png(tmp_path / key / "images" / f"{key}.png", mode="RGB")
        ms = [rand_mask() for _ in range(3)]
        for j, m in enumerate(ms):
            png(tmp_path / key / "masks" / f"m{j}.png", mask=m)
        truth[key] = np.logical_or.reduce(ms)
    listing = list_records(str(tmp_path), "dsb2018", check_sizes=True)
    assert [r.id for r in listing.records] == ["a1", "b2"]
    assert all(len(r.mask_uris) == 3 and r.label == -1 for r in listing.records)
    for rec in listing.records:
        np.testing.assert_array_equal(load_record(rec)["mask"], truth[rec.id].astype(np.uint8))

    png(tmp_path / "c3" / "images" / "c3.png")  # no masks
    png(tmp_path / "d4" / "masks" / "m0.png", mask=rand_mask())  # no image
    png(tmp_path / "a1" / "images" / "extra.png")  # second image for a1
    with pytest.raises(LayoutError):
        list_records(str(tmp_path), "dsb2018")
    listing = list_records(str(tmp_path), "dsb2018", strict=False)
    assert [r.id for r in listing.records] == ["a1", "b2"]
    paths = sorted(Path(s.path).relative_to(tmp_path).as_posix() for s in listing.skipped)
    assert paths == ["a1/images/extra.png", "c3/images/c3.png", "d4/masks/m0.png"]


# ----------------------------------------------------------------------------------------------
# generic folder


def test_folder_with_suffix_labels_and_subdirs(tmp_path):
    truth = {}
    for key in ("x", "sub/y", "z"):
        png(tmp_path / "imgs" / f"{key}.png")
        truth[key] = rand_mask()
        png(tmp_path / "lbl" / f"{key}_seg.png", mask=truth[key])
    (tmp_path / "meta.csv").write_text("name,grade,site\nx.png,cancer,a\ny,healthy,b\n")
    listing = list_records(
        str(tmp_path),
        "folder",
        image_dir="imgs",
        mask_dir="lbl",
        mask_suffix="_seg",
        labels_csv="meta.csv",
        id_column="name",
        label_column="grade",
    )
    assert [r.id for r in listing.records] == ["sub/y", "x", "z"]
    assert listing.class_names == ("cancer", "healthy")
    assert [r.label for r in listing.records] == [1, 0, -1]
    for rec in listing.records:
        np.testing.assert_array_equal(load_record(rec)["mask"], truth[rec.id].astype(np.uint8))
    # label column by index, explicit class names
    by_index = list_records(
        str(tmp_path),
        "folder",
        image_dir="imgs",
        mask_dir="lbl",
        mask_suffix="_seg",
        labels_csv=str(tmp_path / "meta.csv"),
        label_column=1,
        class_names=("healthy", "cancer"),
    )
    assert [r.label for r in by_index.records] == [0, 1, -1]


def test_labels_match_decomposed_file_names_and_unmatched_ones_are_named(tmp_path):
    """macOS writes 'café' in a file name as 'cafe' + a combining accent (NFD), a CSV as one
    code point (NFC): those images lost their labels, and ids matching no image went unsaid."""
    import unicodedata

    for key in ("café", "Zürich", "plain", "unlisted"):
        name = unicodedata.normalize("NFD", key)
        png(tmp_path / "imgs" / f"{name}.png")
        png(tmp_path / "masks" / f"{name}.png", mask=rand_mask())
    (tmp_path / "labels.csv").write_text("id,label\ncafé,1\nZürich.png,0\nplain,1\nghost,0\n",
                                         encoding="utf-8")
    with pytest.warns(UserWarning) as caught:
        listing = list_records(str(tmp_path), "folder", image_dir="imgs", labels_csv="labels.csv",
                               strict=True)
    labels = {unicodedata.normalize("NFC", r.id): r.label for r in listing.records}
    assert labels == {"café": 1, "Zürich": 0, "plain": 1, "unlisted": -1}
    messages = sorted(str(w.message) for w in caught)
    assert messages == [
        "labels.csv: 1 image(s) have no label there ('unlisted'); they get label -1 and the "
        "classifier stage leaves them out",
        "labels.csv: 1 labelled id(s) match no image of the archive ('ghost'); their labels are "
        "unused"]


def test_every_format_the_decoder_reads_is_listed(tmp_path):
    """Only .png/.jpg/.bmp/.tif were listed: a .webp image or a Carvana-style .gif mask was
    passed over without a word although medseg_core.io decodes both."""
    from PIL import Image

    truth = {}
    (tmp_path / "imgs").mkdir()
    (tmp_path / "lbl").mkdir()
    for key, image_ext, mask_ext in (("a", ".webp", ".gif"), ("b", ".ppm", ".png"),
                                     ("c", ".jfif", ".GIF")):
        truth[key] = rand_mask()
        Image.fromarray(RNG.integers(0, 256, (6, 8, 3), dtype=np.uint8)).save(
            tmp_path / "imgs" / f"{key}{image_ext}",
            format={".webp": "WEBP", ".ppm": "PPM", ".jfif": "JPEG"}[image_ext])
        Image.fromarray(truth[key].astype(np.uint8) * 255).save(
            tmp_path / "lbl" / f"{key}_mask{mask_ext}", format=mask_ext[1:].upper())
    listing = list_records(str(tmp_path), "folder", image_dir="imgs", mask_dir="lbl",
                           mask_suffix="_mask", strict=True)
    assert [r.id for r in listing.records] == ["a", "b", "c"]
    for rec in listing.records:
        np.testing.assert_array_equal(load_record(rec)["mask"], truth[rec.id].astype(np.uint8))


def test_folder_int_labels_and_same_dir(tmp_path):
    for key in ("p", "q"):
        png(tmp_path / "all" / f"{key}.png")
        png(tmp_path / "all" / f"{key}_mask.png", mask=rand_mask())
    (tmp_path / "labels.csv").write_text("id,label\np,2\nq,0\n")
    listing = list_records(
        str(tmp_path),
        "folder",
        image_dir="all",
        mask_dir="all",
        mask_suffix="_mask",
        labels_csv="labels.csv",
    )
    assert [(r.id, r.label) for r in listing.records] == [("p", 2), ("q", 0)]
    # with class names known, an integer label must index them (-1: no label); a bad one is
    # reported and its image left unlabelled, as for an unknown class name
    (tmp_path / "labels.csv").write_text("id,label\np,2\nq,1\n")
    kw = dict(image_dir="all", mask_dir="all", mask_suffix="_mask", labels_csv="labels.csv",
              class_names=["benign", "malignant"])
    listing = list_records(str(tmp_path), "folder", strict=False, **kw)
    assert [(r.id, r.label) for r in listing.records] == [("p", -1), ("q", 1)]
    assert ["label 2 is not an index of class_names" in p.reason for p in listing.skipped] == [
        True]
    with pytest.raises(LayoutError, match="labels.csv: id 'p': label 2 is not an index"):
        list_records(str(tmp_path), "folder", strict=True, **kw)
    with pytest.raises(ValueError, match="mask_suffix"):
        list_records(str(tmp_path), "folder", image_dir="all", mask_dir="all")


def test_a_labels_csv_is_read_under_the_archive_byte_limit(tmp_path):
    from medseg_core.io import ImageTooLargeError

    for key in ("p", "q"):
        png(tmp_path / "all" / f"{key}.png")
        png(tmp_path / "all" / f"{key}_mask.png", mask=rand_mask())
    (tmp_path / "labels.csv").write_text("id,label\np,1\nq,0\n" + "#" * 100)
    kw = dict(image_dir="all", mask_dir="all", mask_suffix="_mask", labels_csv="labels.csv")
    with pytest.raises(ImageTooLargeError, match="labels.csv: .* more than max_bytes \\(64\\)"):
        list_records(str(tmp_path), "folder", max_bytes=64, **kw)
    for limit in (None, 10_000):
        listing = list_records(str(tmp_path), "folder", max_bytes=limit, **kw)
        assert [(r.id, r.label) for r in listing.records] == [("p", 1), ("q", 0)]


def test_folder_nested_mask_dir_and_bad_csv(tmp_path):
    png(tmp_path / "a.png")
    png(tmp_path / "masks" / "a.png", mask=rand_mask())
    listing = list_records(str(tmp_path), "folder", image_dir="", mask_dir="masks")
    assert [r.id for r in listing.records] == ["a"]
    (tmp_path / "l.csv").write_text("id,label\na,tumour\n")
    with pytest.raises(LayoutError, match="l.csv.*unknown class"):
        list_records(
            str(tmp_path),
            "folder",
            image_dir="",
            mask_dir="masks",
            labels_csv="l.csv",
            class_names=("x", "y"),
        )
    with pytest.raises(LayoutError, match="l.csv.*no column 'grade'"):
        list_records(
            str(tmp_path),
            "folder",
            image_dir="",
            mask_dir="masks",
            labels_csv="l.csv",
            label_column="grade",
        )


def test_folder_images_nested_in_mask_dir(tmp_path):
    m = rand_mask()
    png(tmp_path / "imgs" / "a.png")
    png(tmp_path / "a_m.png", mask=m)
    listing = list_records(str(tmp_path), "folder", image_dir="imgs", mask_dir="", mask_suffix="_m")
    assert [(r.id, Path(r.mask_uris[0]).name) for r in listing.records] == [("a", "a_m.png")]
    np.testing.assert_array_equal(load_record(listing.records[0])["mask"], m.astype(np.uint8))


def test_folder_orphan_and_missing(tmp_path):
    png(tmp_path / "images" / "a.png")
    png(tmp_path / "images" / "b.png")
    png(tmp_path / "masks" / "a.png", mask=rand_mask())
    png(tmp_path / "masks" / "c.png", mask=rand_mask())
    listing = list_records(str(tmp_path), "folder", strict=False)
    assert [r.id for r in listing.records] == ["a"]
    assert sorted((Path(s.path).name, s.reason.split(" (")[0]) for s in listing.skipped) == [
        ("b.png", "no mask"),
        ("c.png", "mask without image"),
    ]


# ----------------------------------------------------------------------------------------------
# images (no masks)


def test_images_layout(tmp_path):
    png(tmp_path / "one.png")
    png(tmp_path / "deep" / "two.png")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "three.jpg")
    (tmp_path / "notes.csv").write_text("x")
    listing = list_records(str(tmp_path), "images")
    assert [r.id for r in listing.records] == ["deep/two", "one", "three"]
    # counted and named (a DICOM study vanished from the bulk job's report), not bad input
    assert [(s.path.rsplit("/", 1)[-1], s.reason, s.bad) for s in listing.skipped] == [
        ("notes.csv", "not an image file by its extension (.csv): not processed", False)]
    assert all(r.mask_uris == () and r.label == -1 for r in listing.records)
    sample = load_record(listing.records[1])
    assert sample["mask"].shape == sample["image"].shape[:2] and not sample["mask"].any()
    flat = list_records(str(tmp_path), "images", recursive=False)
    assert [r.id for r in flat.records] == ["one", "three"]
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "one.bmp")
    with pytest.raises(LayoutError, match="duplicate id 'one'"):
        list_records(str(tmp_path), "images")


# ----------------------------------------------------------------------------------------------
# file names that are not UTF-8


def test_valid_text_escapes_only_lone_surrogates():
    assert valid_text("ünïcode 名前 (1)") == "ünïcode 名前 (1)"
    assert valid_text(os.fsdecode(b"caf\xe9/x\xff")) == "caf\\xe9/x\\xff"
    assert valid_text("a\ud800b") == "a\\ud800b"  # not from a file name byte: \u escape


def raw_png(root: Path, name: bytes, **kw) -> tuple[str, np.ndarray]:
    """A PNG at the raw (bytes) name under ``root``: (its real path as os.fsdecode gives it,
    its pixels); skips where the filesystem refuses names that are not UTF-8."""
    path = os.path.join(os.fsencode(root), name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        open(path, "wb").close()
    except OSError:
        pytest.skip("this filesystem refuses file names that are not UTF-8")
    arr = png(Path(os.fsdecode(path)), **kw)
    return os.fsdecode(path), arr


def test_names_that_are_not_utf8_give_valid_ids_and_read_the_real_file(tmp_path):
    caf, caf_pixels = raw_png(tmp_path / "flat", b"caf\xe9.png")
    deep, _ = raw_png(tmp_path / "flat", b"d\xe9p/na\xefve.png")
    raw_png(tmp_path / "flat", b"ok.png")
    listing = list_records(str(tmp_path / "flat"), "images")
    assert [r.id for r in listing.records] == ["caf\\xe9", "d\\xe9p/na\\xefve", "ok"]
    assert [r.image_uri for r in listing.records[:2]] == [caf, deep]  # the real paths
    for rec in listing.records:
        rec.id.encode("utf-8")  # storable in Parquet / JSON
    np.testing.assert_array_equal(load_record(listing.records[0])["image"][..., 0], caf_pixels)

    m = rand_mask()
    raw_png(tmp_path / "busi", b"benign/caf\xe9.png")
    raw_png(tmp_path / "busi", b"benign/caf\xe9_mask.png", mask=m)
    [busi] = list_records(str(tmp_path / "busi"), "busi").records
    assert (busi.id, busi.label) == ("benign/caf\\xe9", 1)
    np.testing.assert_array_equal(load_record(busi)["mask"], m.astype(np.uint8))

    raw_png(tmp_path / "folder", b"imgs/x\xff.png")
    raw_png(tmp_path / "folder", b"lbl/x\xff_seg.png", mask=m)
    [folder] = list_records(str(tmp_path / "folder"), "folder", image_dir="imgs",
                            mask_dir="lbl", mask_suffix="_seg").records
    assert folder.id == "x\\xff"
    np.testing.assert_array_equal(load_record(folder)["mask"], m.astype(np.uint8))

    raw_png(tmp_path / "isic", b"in/ISIC_\xe9.png")
    raw_png(tmp_path / "isic", b"gt/ISIC_\xe9_segmentation.png", mask=m)
    [isic] = list_records(str(tmp_path / "isic"), "isic2018", image_dir="in",
                          mask_dir="gt").records
    assert isic.id == "ISIC_\\xe9"

    raw_png(tmp_path / "dsb", b"\xe9t/images/\xe9t.png")
    raw_png(tmp_path / "dsb", b"\xe9t/masks/m0.png", mask=m)
    [dsb] = list_records(str(tmp_path / "dsb"), "dsb2018").records
    assert dsb.id == "\\xe9t"
    np.testing.assert_array_equal(load_record(dsb)["mask"], m.astype(np.uint8))


def test_escaped_id_colliding_with_a_valid_name_is_a_duplicate(tmp_path):
    latin1, _ = raw_png(tmp_path, b"caf\xe9.png")
    png(tmp_path / "caf\\xe9.png")  # a valid name spelling the escape: the same id
    with pytest.raises(LayoutError, match=re.escape("duplicate id 'caf\\xe9'")):
        list_records(str(tmp_path), "images")
    listing = list_records(str(tmp_path), "images", strict=False)
    assert [(r.id, r.image_uri) for r in listing.records] == [
        ("caf\\xe9", str(tmp_path / "caf\\xe9.png"))]
    [dup] = listing.skipped
    assert dup.path == valid_text(latin1) and "duplicate id" in dup.reason
    json.dumps([dup.path, dup.reason], ensure_ascii=False).encode("utf-8")  # no surrogates

    busi = tmp_path / "busi"
    raw_png(busi, b"benign/gh\xf6st_mask.png", mask=rand_mask())
    png(busi / "benign" / "ok.png")  # a listing must find a record (or it raises)
    png(busi / "benign" / "ok_mask.png", mask=rand_mask())
    [orphan] = list_records(str(busi), "busi", strict=False).skipped
    assert orphan.path == str(busi / "benign" / "gh\\xf6st_mask.png")
    assert "mask without image (expected 'benign/gh\\xf6st.png')" in orphan.reason


# ----------------------------------------------------------------------------------------------
# shared datasets


@pytest.mark.shared_data
def test_shared_busi(shared_data):
    listing = list_records(str(shared_data / "busi"), "busi")
    assert len(listing.records) == 780 and listing.skipped == []
    counts = Counter(listing.class_names[r.label] for r in listing.records)
    assert counts == {"benign": 437, "malignant": 210, "normal": 133}
    ids = [r.id for r in listing.records]
    assert ids == sorted(ids) and len(set(ids)) == 780
    assert "benign/benign (1)" in ids
    normal = next(r for r in listing.records if r.label == 0)
    assert not load_record(normal)["mask"].any()
    benign = next(r for r in listing.records if r.id == "benign/benign (1)")
    sample = load_record(benign)
    assert sample["image"].shape == (256, 256, 3) and sample["mask"].any()


@pytest.mark.shared_data
def test_shared_busi_full(shared_data):
    listing = list_records((shared_data / "busi_full").as_uri(), "busi")
    assert len(listing.records) == 647
    assert {r.label for r in listing.records} == {1, 2}
    assert all(r.image_uri.startswith("file://") for r in listing.records)


@pytest.mark.shared_data
def test_shared_isbi2012(shared_data):
    listing = list_records(
        str(shared_data / "isbi2012"),
        "folder",
        image_dir="train/images",
        mask_dir="train/labels",
        check_sizes=True,
    )
    assert len(listing.records) == 30
    sample = load_record(listing.records[0], channels=1)
    assert sample["image"].shape == (512, 512, 1)
    assert 0 < sample["mask"].mean() < 1
    test = list_records(str(shared_data / "isbi2012" / "test" / "images"), "images")
    assert len(test.records) == 30


@pytest.mark.shared_data
def test_shared_dsb2018_96(shared_data):
    listing = list_records(str(shared_data / "dsb2018_96"), "folder", check_sizes=True)
    assert len(listing.records) == 670
    sample = load_record(listing.records[0])
    assert sample["image"].shape == (96, 96, 3)
    assert set(np.unique(sample["mask"]).tolist()) <= {0, 1}
