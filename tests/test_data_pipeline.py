"""pipelines/data.py: listing, splits, the Ray Data pipeline, bad input, S3, per-epoch augmentation.

Real components throughout: the session's local Ray cluster, a real S3-compatible server
(SeaweedFS) on 127.0.0.1, PNG files on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from medseg_core.dataset import RecordDataset
from medseg_core.io import encode_mask_png, encode_png
from medseg_core.transforms import build_transforms
from pipelines.config import load_config
from pipelines.data import (
    EnvCredentials,
    build_dataset,
    build_datasets,
    data_report,
    list_archive,
    load_splits,
    storage_options,
    train_epoch_dataset,
)


def make_cfg(tmp_path: Path, url: str, *overrides: str) -> dict:
    """The composed config as a user gets it, pointed at `url`, small and fast."""
    return load_config([f"output_dir={tmp_path}/out", "run_name=t", f"data.url={url}",
                        "data.image_size=[64,64]", "data.read.batch_size=4", *overrides])


def digest(image: np.ndarray, mask: np.ndarray, label: int) -> str:
    return hashlib.sha1(image.tobytes() + mask.tobytes() + bytes([int(label) % 256])).hexdigest()


def digests(ds) -> Counter:
    """Multiset of row digests of a Dataset (row order is not deterministic in Ray Data)."""
    out: Counter = Counter()
    for b in ds.iter_batches(batch_size=8, batch_format="numpy"):
        assert set(b) == {"image", "mask", "label"}
        for img, m, lab in zip(b["image"], b["mask"], b["label"]):
            out[digest(img, m, lab)] += 1
    return out


def in_process_digests(records, cfg: dict, epoch: int | None) -> Counter:
    """The same split through medseg_core's in-process RecordDataset (train.py's local path)."""
    data = cfg["data"]
    aug = dict(data["augment"]) if epoch is not None else {}
    tf = build_transforms({"size": list(data["image_size"]), **aug}, train=bool(aug))
    rd = RecordDataset(records, tf, seed=int(cfg["seed"]))
    rd.set_epoch(epoch or 0)
    return Counter(digest(s["image"], s["mask"], s["label"]) for s in rd)


def copy_archive(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------ no Ray


def test_storage_options_endpoint_and_no_credentials():
    data = {"url": "s3://bucket/prefix", "endpoint_url": "http://127.0.0.1:9000",
            "region": "eu-west-1", "anonymous": True, "storage_options": {}}
    so = storage_options(data)
    assert so == {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000",
                                    "region_name": "eu-west-1"}, "anon": True}
    assert storage_options({"url": "/local/path", "endpoint_url": "http://x"}) is None
    for bad in ({"key": "AKIA"}, {"client_kwargs": {"aws_secret_access_key": "s"}}):
        with pytest.raises(ValueError, match="environment"):
            storage_options({"url": "s3://b/p", "storage_options": bad})
    creds = EnvCredentials((("AWS_ACCESS_KEY_ID", "id"), ("AWS_SECRET_ACCESS_KEY", "sk")))
    assert "sk" not in repr(creds) and "id'" not in repr(creds)
    applied = creds.apply({"client_kwargs": {"endpoint_url": "http://e"}})
    assert applied == {"key": "id", "secret": "sk", "client_kwargs": {"endpoint_url": "http://e"}}
    assert "key" not in creds.apply({"anon": True})


def test_splits_disjoint_deterministic_and_group_duplicates(synthetic_archive, tmp_path):
    arc = copy_archive(synthetic_archive, tmp_path / "arc")
    # the same scan filed twice under two classes: it must never straddle two splits
    shutil.copy(arc / "benign" / "benign (1).png", arc / "malignant" / "malignant (9).png")
    shutil.copy(arc / "benign" / "benign (1)_mask.png", arc / "malignant" / "malignant (9)_mask.png")
    for mode in (["data.split.mode=ratio"], ["data.split.mode=kfold", "data.split.fold=2"]):
        cfg = make_cfg(tmp_path, str(arc), *mode)
        a, b = load_splits(cfg), load_splits(cfg)
        ids = {k: [r.id for r in v] for k, v in a.items()}
        assert ids == {k: [r.id for r in v] for k, v in b.items()}
        flat = [i for v in ids.values() for i in v]
        assert len(flat) == len(set(flat)) == 16
        where = {i: k for k, v in ids.items() for i in v}
        assert where["benign/benign (1)"] == where["malignant/malignant (9)"]


def test_a_missing_archive_or_a_layout_matching_nothing_fails_at_listing(tmp_path):
    """Training on a mistyped data.url (or the wrong layout) warned of a dropped 'bad input
    file' and failed later on an empty validation split: listing refuses it, naming the URL
    (and the layout and the files it saw), with no warning first."""
    from medseg_core.layouts import LayoutError

    plain = tmp_path / "plain"
    plain.mkdir()
    for i in range(3):
        (plain / f"img{i}.png").write_bytes(encode_png(np.zeros((8, 8, 3), np.uint8)))
    missing = str(tmp_path / "nothing")
    for url, message in ((missing, f"{missing}: the archive does not exist"),
                         (str(plain), f"{plain}: layout 'busi' found no record among the 3 file")):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(LayoutError, match=message):
                load_splits(make_cfg(tmp_path, url, "data=busi"))


def test_a_listing_of_object_storage_says_what_it_waits_for(tmp_path, monkeypatch, capsys):
    """A store that accepts connections and never answers kept a run silent for 7 minutes
    (botocore's read timeouts, retried) before its one-line error."""
    import time

    import pipelines.data as data
    from medseg_core.layouts import Listing

    def slow_listing(*args, **kwargs):  # as an endpoint that does not answer, for a while
        time.sleep(0.5)
        return Listing(records=[])

    monkeypatch.setattr(data, "list_records", slow_listing)
    monkeypatch.setattr(data, "PROGRESS_EVERY_S", 0.02)
    cfg = make_cfg(tmp_path, "s3://bucket/arc", "data=busi",
                   "data.endpoint_url=http://127.0.0.1:9")["data"]
    data.list_archive(cfg)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "[data] listing s3://bucket/arc at http://127.0.0.1:9"
    assert any(x.startswith("[data] still listing s3://bucket/arc: ") and
               x.endswith(" s without an answer so far") for x in out[1:])


def test_an_endpoint_that_is_not_s3_is_named_where_the_archive_seems_missing(tmp_path,
                                                                            monkeypatch):
    """Another port of the store (its filer, its master) or any web server answers 404 to
    every S3 request, which read as "the archive does not exist"."""
    import http.server
    import threading

    from medseg_core.layouts import LayoutError

    class NotS3(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the standard library's name)
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET  # noqa: N815

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotS3)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    try:
        with pytest.raises(LayoutError, match=rf"the archive does not exist.*; or "
                           rf"data.endpoint_url={endpoint} is not the S3 endpoint"):
            load_splits(make_cfg(tmp_path, "s3://bucket/arc", "data=busi",
                                 f"data.endpoint_url={endpoint}"))
    finally:
        server.shutdown()


# ------------------------------------------------------------------------------ Ray pipeline


@pytest.mark.ray
def test_rows_are_fixed_size_tensors(ray_cluster, synthetic_archive, tmp_path):
    import torch

    cfg = make_cfg(tmp_path, synthetic_archive, "data.image_size=[48,40]")
    dss = build_datasets(cfg)
    assert set(dss) == {"train", "val", "test"}
    n = 0
    for batch in dss["train"].iter_torch_batches(batch_size=5):
        assert set(batch) == {"image", "mask", "label"}
        assert batch["image"].dtype == torch.uint8 and batch["image"].shape[1:] == (48, 40, 3)
        assert batch["mask"].dtype == torch.uint8 and batch["mask"].shape[1:] == (48, 40)
        assert batch["label"].dtype == torch.int64
        assert set(batch["mask"].unique().tolist()) <= {0, 1}
        n += len(batch["label"])
    assert n == len(load_splits(cfg)["train"])
    # eval splits: decoded and resized exactly as the in-process path does it
    splits = load_splits(cfg)
    assert digests(dss["val"]) == in_process_digests(splits["val"], cfg, None)


def write_aligned_archive(root: Path, n: int = 12) -> Path:
    """Grey images whose mask is derivable from the pixels: an off-centre, asymmetric lesion
    (200) on background (40), several sizes; mask = image > 120 before any transform."""
    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = int(rng.integers(48, 90)), int(rng.integers(48, 90))
        yy, xx = np.mgrid[:h, :w]
        cy, cx = h * rng.uniform(0.25, 0.4), w * rng.uniform(0.2, 0.35)
        mask = (((yy - cy) / (0.22 * h)) ** 2 + ((xx - cx) / (0.15 * w)) ** 2) <= 1
        mask |= (yy > cy) & (yy < cy + 0.1 * h) & (xx > cx) & (xx < cx + 0.45 * w)  # a tail
        image = np.where(mask, 200, 40).astype(np.uint8)
        cls = "benign" if i % 2 else "malignant"
        (root / cls).mkdir(parents=True, exist_ok=True)
        (root / cls / f"{cls} ({i}).png").write_bytes(encode_png(image))
        (root / cls / f"{cls} ({i})_mask.png").write_bytes(encode_mask_png(mask))
    return root


@pytest.mark.ray
def test_augmentation_keeps_masks_aligned(ray_cluster, tmp_path):
    arc = write_aligned_archive(tmp_path / "aligned")
    cfg = make_cfg(tmp_path, str(arc), "data.augment.rotate=30", "data.augment.vflip=0.5",
                   "data.split.ratios=[1,0,0]", "data.split.dedup_distance=-1")
    splits = load_splits(cfg)
    ds = build_dataset(splits["train"], cfg, split="train")
    plain = digests(build_dataset(splits["train"], cfg, split="eval", train=False))
    agree, agree_flipped, augmented = [], [], 0
    for _epoch in range(2):
        for b in ds.iter_batches(batch_size=4, batch_format="numpy"):
            for img, m, lab in zip(b["image"], b["mask"], b["label"]):
                derived = img[..., 0] > 120
                agree.append(float((derived == m.astype(bool)).mean()))
                agree_flipped.append(float((derived == m[:, ::-1].astype(bool)).mean()))
                augmented += digest(img, m, lab) not in plain
                assert m.sum() > 0
    assert len(agree) == 24
    assert min(agree) > 0.97, agree               # mask follows every geometric change
    assert np.mean(agree_flipped) < 0.9           # ...and the check would catch a mismatch
    assert augmented >= 20                        # augmentation actually happened


@pytest.mark.ray
def test_epoch_augmentation_differs_and_is_reproducible(ray_cluster, synthetic_archive, tmp_path):
    cfg = make_cfg(tmp_path, synthetic_archive, "data.split.ratios=[1,0,0]", "seed=3")
    splits = load_splits(cfg)
    records = splits["train"]
    first = build_datasets(cfg, {"train": records})["train"]
    e0, e1 = digests(first), digests(first)        # each pass is the next epoch
    assert sum(e0.values()) == sum(e1.values()) == 15
    assert not set(e0) & set(e1)                   # every sample augmented differently
    again = build_datasets(cfg, {"train": records})["train"]
    assert digests(again) == e0 and digests(again) == e1   # same seed: same epochs
    # explicit epochs give the same augmentation, and so does the in-process RecordDataset
    assert digests(train_epoch_dataset(first, 1)) == e1
    assert in_process_digests(records, cfg, 1) == e1
    other_seed = build_datasets({**cfg, "seed": 4}, {"train": records})["train"]
    assert not set(digests(other_seed)) & set(e0)
    # gpu_augment: train rows are only resized
    gpu = {**cfg, "trainer": {**cfg["trainer"], "gpu_augment": True}}
    assert digests(build_datasets(gpu, {"train": records})["train"]) == \
        in_process_digests(records, cfg, None)


@pytest.mark.ray
def test_ray_train_shards_follow_epochs(ray_cluster, synthetic_archive, tmp_path):
    """Through Ray Train V2 exactly as pipelines/train_ray.py uses it: get_dataset_shard in two
    workers, iter_torch_batches once per epoch; the shards of epoch k hold the samples the
    in-process RecordDataset gives for epoch k (and none of another epoch's)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = make_cfg(tmp_path, synthetic_archive, "data.split.ratios=[1,0,0]")
    records = load_splits(cfg)["train"]
    out = tmp_path / "seen"
    out.mkdir()

    def loop(config: dict) -> None:
        import ray.train

        shard, rank = ray.train.get_dataset_shard("train"), ray.train.get_context().get_world_rank()
        for epoch in range(2):
            seen = [digest(b["image"][i].numpy(), b["mask"][i].numpy(), int(b["label"][i]))
                    for b in shard.iter_torch_batches(batch_size=4) for i in range(len(b["label"]))]
            Path(config["out"], f"{rank}-{epoch}").write_text("\n".join(seen))
            ray.train.report({"epoch": epoch})

    result = TorchTrainer(
        loop, train_loop_config={"out": str(out)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(storage_path=str(tmp_path / "ray"), name="shards"),
        datasets=build_datasets(cfg, {"train": records})).fit()
    assert result.error is None
    for epoch in range(2):
        got = Counter(d for rank in range(2)
                      for d in (out / f"{rank}-{epoch}").read_text().split("\n") if d)
        want = in_process_digests(records, cfg, epoch)
        other = in_process_digests(records, cfg, 1 - epoch)
        # streaming_split(equal=True) gives both workers 7 of the 15 rows
        assert sum(got.values()) == 14 and not got - want and not set(got) & set(other)


# ------------------------------------------------------------------------------ bad input


BAD_FILES = {"benign (2).png": "empty", "benign (3).png": "truncated",
             "benign (4).png": "not a recognised image", "malignant (1)_mask.png": "mask is",
             "malignant (2).png": "pixels, over the limit"}


def corrupt(arc: Path) -> None:
    """Five kinds of bad file (BAD_FILES) in a copy of the synthetic archive."""
    good = (arc / "benign" / "benign (1).png").read_bytes()
    (arc / "benign" / "benign (2).png").write_bytes(b"")
    (arc / "benign" / "benign (3).png").write_bytes(good[: len(good) // 2])
    (arc / "benign" / "benign (4).png").write_bytes(b"this is not an image at all")
    (arc / "malignant" / "malignant (1)_mask.png").write_bytes(
        encode_mask_png(np.ones((20, 30), np.uint8)))
    (arc / "malignant" / "malignant (2).png").write_bytes(
        encode_png(np.zeros((7000, 7000), np.uint8)))  # 49 Mpx: a decompression bomb


@pytest.fixture(scope="module")
def corrupt_archive(synthetic_archive, tmp_path_factory) -> Path:
    arc = copy_archive(synthetic_archive, tmp_path_factory.mktemp("corrupt") / "arc")
    corrupt(arc)
    return arc


def rows(dss: dict) -> int:
    return sum(len(b["label"]) for ds in dss.values()
               for b in ds.iter_batches(batch_size=8, batch_format="numpy"))


def check_report(rep: dict, expected: dict[str, str]) -> None:
    assert rep["dropped"] == len(expected) == rep["problems"]
    for name, kind in expected.items():
        hits = [e for e in rep["entries"] if e["path"].endswith(name)]
        assert len(hits) == 1, (name, rep["entries"])
        assert kind in hits[0]["reason"], hits[0]


@pytest.mark.ray
@pytest.mark.parametrize("dedup", [False, True], ids=["found-in-ray-tasks", "found-by-hashing"])
def test_bad_files_dropped_counted_and_named(ray_cluster, corrupt_archive, tmp_path, dedup):
    cfg = make_cfg(tmp_path, str(corrupt_archive),
                   *([] if dedup else ["data.split.dedup_distance=-1"]))
    with pytest.warns(UserWarning, match="dropped") if dedup else contextlib.nullcontext():
        dss = build_datasets(cfg)
    assert rows(dss) == 15 - 5
    assert rows(dss) == 10  # a second epoch: the same files, counted once
    with pytest.warns(UserWarning, match=r"benign \(2\)\.png"):
        rep = data_report(cfg)
    check_report(rep, BAD_FILES)
    stages = {e["stage"] for e in rep["entries"]}
    # checked on the driver before splitting (masks too) or, unchecked, dropped in the tasks
    assert stages == ({"check"} if dedup else {"decode"})
    on_disk = json.loads(Path(cfg["data"]["report"]).read_text())
    assert on_disk["dropped"] == 5 and on_disk["entries"] == rep["entries"]


@contextlib.contextmanager
def fifo_writer(fifo: Path):
    """Whoever opens `fifo` to read gets end-of-file at once instead of blocking for ever (so a
    reader that wrongly opens it sees an empty file rather than hanging the test)."""
    import os
    import threading

    stop = threading.Event()

    def serve() -> None:
        while not stop.wait(0.2):
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # ENXIO: no reader yet
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@pytest.mark.ray
@pytest.mark.parametrize("dedup", [False, True], ids=["found-in-ray-tasks", "found-by-hashing"])
def test_oversized_and_special_files_are_refused_unread(ray_cluster, synthetic_archive, tmp_path,
                                                        dedup):
    import os

    arc = copy_archive(synthetic_archive, tmp_path / "arc")
    noise = np.random.default_rng(0).integers(0, 256, (300, 300), dtype=np.uint8)
    (arc / "normal" / "normal (1).png").write_bytes(encode_png(noise))  # ~90 KB, valid
    (arc / "normal" / "normal (1)_mask.png").write_bytes(
        encode_mask_png(np.zeros((300, 300), np.uint8)))
    fifo = arc / "benign" / "benign (4).png"
    fifo.unlink()
    os.mkfifo(fifo)
    loop = arc / "malignant" / "malignant (2).png"  # a link to itself: ELOOP, not a crash
    loop.unlink()
    loop.symlink_to(loop.name)
    cfg = make_cfg(tmp_path, str(arc), "data.max_bytes=60000",
                   *([] if dedup else ["data.split.dedup_distance=-1"]))
    with fifo_writer(fifo), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert rows(build_datasets(cfg)) == 15 - 3
        rep = data_report(cfg, warn=False)
    check_report(rep, {"normal (1).png": "more than max_bytes (60000)",
                       "benign (4).png": "not a regular file",
                       "malignant (2).png": "a loop of symbolic links"})


def test_the_check_before_splitting_shows_progress(synthetic_archive, tmp_path, monkeypatch,
                                                   capsys):
    """Every record of a large archive was decoded on the driver without a word (27 s for
    BUSI's 647 images from S3, growing with the archive)."""
    import pipelines.data as data

    monkeypatch.setattr(data, "PROGRESS_EVERY_S", 0.0)
    records = list_archive(make_cfg(tmp_path, synthetic_archive)["data"]).records[:5]
    data.checked_hashes(records, None, strict=False, threads=1)
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("[data] checked")]
    assert [x.split(" records")[0] for x in lines] == [f"[data] checked {i}/5" for i in
                                                       range(1, 5)]


def test_the_check_cache_holds_per_limits(synthetic_archive, tmp_path):
    """A record checked under one data.max_bytes / max_pixels is checked again under smaller
    ones: the in-process trainer's loader cannot drop a record the check kept."""
    from pipelines.data import checked_hashes

    arc = copy_archive(synthetic_archive, tmp_path / "arc")
    noise = np.random.default_rng(0).integers(0, 256, (300, 300), dtype=np.uint8)
    (arc / "normal" / "normal (1).png").write_bytes(encode_png(noise))  # ~90 KB
    (arc / "normal" / "normal (1)_mask.png").write_bytes(
        encode_mask_png(np.zeros((300, 300), np.uint8)))
    listing = list_archive(make_cfg(tmp_path, str(arc))["data"], stamps=True)
    records, kw = listing.records, {"cache_dir": str(tmp_path / "cache"), "stamps": listing.stamps}
    first, problems = checked_hashes(records, None, strict=False, **kw)
    assert None not in first and not problems
    for limits, reason in (({"max_bytes": 60_000}, "more than max_bytes (60000)"),
                           ({"max_pixels": 50_000}, "over the limit")):
        hashes, problems = checked_hashes(records, None, strict=False, **limits, **kw)
        assert [p.path.rsplit("/", 1)[-1] for p in problems] == ["normal (1).png"], limits
        assert reason in problems[0].reason
        assert hashes.count(None) == 1
    assert checked_hashes(records, None, strict=False, **kw)[0] == first


def test_the_check_cache_follows_each_files_contents(synthetic_archive, tmp_path, monkeypatch):
    """A file damaged or replaced under its name after a run is checked again (the in-process
    trainer crashed on it, and a replaced image kept its old split hash), and a record added
    to the archive leaves the others cached."""
    import os

    import pipelines.data as data

    arc = copy_archive(synthetic_archive, tmp_path / "arc")
    cfg = make_cfg(tmp_path, str(arc))
    decoded: list[str] = []
    real = data.image_phash
    monkeypatch.setattr(data, "image_phash",
                        lambda blob, name, *a: decoded.append(name) or real(blob, name, *a))

    def check() -> tuple[dict[str, int | None], list]:
        listing = data.list_archive(cfg["data"], stamps=True)
        hashes, problems = data.checked_hashes(
            listing.records, None, strict=False, cache_dir=str(tmp_path / "cache"),
            cache_name=str(arc), stamps=listing.stamps)
        return {r.id: h for r, h in zip(listing.records, hashes)}, problems

    first, _ = check()
    n = len(first)
    assert len(decoded) == n
    decoded.clear()
    assert check()[0] == first and decoded == []  # all cached

    damaged = arc / "benign" / "benign (1).png"
    damaged.write_bytes(damaged.read_bytes()[:200])
    replaced = arc / "normal" / "normal (2).png"
    other = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    stat = replaced.stat()
    replaced.write_bytes(encode_png(other))
    os.utime(replaced, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # even within one tick
    added = arc / "malignant" / "malignant (99).png"
    added.write_bytes(encode_png(other))
    (arc / "malignant" / "malignant (99)_mask.png").write_bytes(
        encode_mask_png(np.zeros((64, 64), np.uint8)))
    decoded.clear()
    hashes, problems = check()
    assert sorted(decoded) == sorted(str(p) for p in (damaged, replaced, added))
    assert [p.path for p in problems] == [str(damaged)]
    assert hashes["benign/benign (1)"] is None
    assert hashes["normal/normal (2)"] == hashes["malignant/malignant (99)"] != first[
        "normal/normal (2)"]
    assert {k: v for k, v in hashes.items() if k in first and k not in (
        "benign/benign (1)", "normal/normal (2)")} == {
        k: v for k, v in first.items() if k not in ("benign/benign (1)", "normal/normal (2)")}


def _same_size_garbage(fs, path: str) -> None:
    """Overwrite a file with as many bytes of garbage: the size a listing shows stays."""
    fs.pipe_file(path, b"\x00" * fs.size(path))


def test_the_check_cache_is_not_trusted_where_the_listing_shows_only_sizes(synthetic_archive,
                                                                            tmp_path):
    """A filesystem whose listing shows no modification time, ETag or checksum cannot tell a
    file replaced by one of the same size: its records are checked every time."""
    from fsspec.implementations.local import LocalFileSystem

    from pipelines.data import checked_hashes

    arc = copy_archive(synthetic_archive, tmp_path / "arc")
    listing = list_archive(make_cfg(tmp_path, str(arc))["data"], stamps=True)
    sizes_only = {u: stamp.partition(":")[0] + ":" for u, stamp in listing.stamps.items()}
    kw = {"cache_dir": str(tmp_path / "cache"), "stamps": sizes_only}
    first, problems = checked_hashes(listing.records, None, strict=False, **kw)
    assert None not in first and not problems
    victim = arc / "benign" / "benign (1).png"
    _same_size_garbage(LocalFileSystem(), str(victim))
    hashes, problems = checked_hashes(listing.records, None, strict=False, **kw)
    assert [p.path for p in problems] == [str(victim)]
    assert hashes.count(None) == 1


def test_the_check_cache_follows_files_replaced_in_memory(synthetic_archive, tmp_path):
    """fsspec's memory filesystem lists a creation time, which a rewrite renews: a file
    replaced by one of the same size is checked again (and one left alone is not)."""
    import uuid

    import fsspec

    import pipelines.data as data

    fs = fsspec.filesystem("memory")
    url = f"memory://medseg-test-cache/{uuid.uuid4().hex}"
    fs.put(f"{synthetic_archive}/", url.removeprefix("memory://"), recursive=True)
    cfg = make_cfg(tmp_path, url)

    def check() -> tuple[list, list]:
        listing = data.list_archive(cfg["data"], stamps=True)
        assert all(stamp.partition(":")[2] for stamp in listing.stamps.values())
        uris.update({r.id: r.image_uri for r in listing.records})
        return data.checked_hashes(listing.records, None, strict=False, stamps=listing.stamps,
                                   cache_dir=str(tmp_path / "cache"), cache_name=url)

    uris: dict[str, str] = {}
    try:
        first, problems = check()
        assert None not in first and not problems
        victim = uris["malignant/malignant (1)"]
        _same_size_garbage(fs, victim)
        hashes, problems = check()
        assert [p.path for p in problems] == [victim]
        assert hashes.count(None) == 1
    finally:
        fs.rm(url.removeprefix("memory://"), recursive=True)


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.parametrize("dedup", [False, True], ids=["found-in-ray-tasks", "found-by-hashing"])
def test_bad_files_on_object_storage_are_reported_as_on_disk(ray_cluster, s3, corrupt_archive,
                                                             tmp_path, monkeypatch, dedup):
    """Over s3:// the same five bad files are dropped and named for the same reasons: an empty
    object's ranged read is refused by the server (416), which is not a storage failure."""
    url = f"s3://medseg-data/archives/corrupt-{dedup}"
    s3.upload_dir(corrupt_archive, url)
    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.env["AWS_ACCESS_KEY_ID"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.env["AWS_SECRET_ACCESS_KEY"])
    cfg = make_cfg(tmp_path, url, f"data.endpoint_url={s3.endpoint}", "data.region=us-east-1",
                   *([] if dedup else ["data.split.dedup_distance=-1"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert rows(build_datasets(cfg)) == 15 - 5
    check_report(data_report(cfg, warn=False), BAD_FILES)


@pytest.mark.ray
def test_strict_fails_fast_naming_the_file(ray_cluster, synthetic_archive, tmp_path):
    arc = copy_archive(synthetic_archive, tmp_path / "arc")
    (arc / "normal" / "normal (3).png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    # on the driver (hashing for the splits)
    with pytest.raises(ValueError, match=r"normal \(3\)\.png"):
        load_splits(make_cfg(tmp_path, str(arc), "data.strict=true"))
    # in the Ray read tasks
    cfg = make_cfg(tmp_path, str(arc), "data.strict=true", "data.split.dedup_distance=-1")
    dss = build_datasets(cfg)
    with pytest.raises(Exception, match=r"normal \(3\)\.png"):
        rows(dss)


@pytest.mark.ray
def test_listing_problems_are_reported(ray_cluster, synthetic_archive, tmp_path):
    arc = copy_archive(synthetic_archive, tmp_path / "arc")
    (arc / "benign" / "benign (5)_mask.png").unlink()   # an image without its mask
    cfg = make_cfg(tmp_path, str(arc))
    with pytest.warns(UserWarning, match=r"benign \(5\)\.png"):
        splits = load_splits(cfg)
    assert sum(len(v) for v in splits.values()) == 14
    rep = data_report(cfg, warn=False)
    assert rep["by_stage"] == {"listing": 1} and "no mask" in rep["entries"][0]["reason"]


# ------------------------------------------------------------------------------ object storage


@pytest.mark.ray
@pytest.mark.s3
def test_read_from_s3_like_a_user(ray_cluster, s3, synthetic_archive, tmp_path, monkeypatch):
    s3.upload_dir(synthetic_archive, "s3://medseg-data/archives/synthetic")
    # credentials from the environment only; the endpoint from the data config
    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.env["AWS_ACCESS_KEY_ID"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.env["AWS_SECRET_ACCESS_KEY"])
    cfg = make_cfg(tmp_path, "s3://medseg-data/archives/synthetic",
                   f"data.endpoint_url={s3.endpoint}", "data.region=us-east-1")
    local = make_cfg(tmp_path / "local", synthetic_archive)
    remote_splits, local_splits = load_splits(cfg), load_splits(local)
    assert {k: [r.id for r in v] for k, v in remote_splits.items()} == \
        {k: [r.id for r in v] for k, v in local_splits.items()}
    assert remote_splits["train"][0].image_uri.startswith("s3://medseg-data/")
    remote, here = build_datasets(cfg, remote_splits), build_datasets(local, local_splits)
    for split in ("val", "test"):
        assert digests(remote[split]) == digests(here[split])     # identical pixels
    assert digests(train_epoch_dataset(remote["train"], 2)) == \
        digests(train_epoch_dataset(here["train"], 2))
    rep = data_report(cfg, warn=False)
    assert rep["dropped"] == 0
    # wrong credentials fail loudly; they are not 15 "bad files"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(Exception, match="(?i)signature|denied|forbidden|credentials"):
        rows(build_datasets(cfg, remote_splits))
    assert data_report(cfg, warn=False)["dropped"] == 0
    secret = s3.env["AWS_SECRET_ACCESS_KEY"]
    assert secret not in json.dumps(cfg) and secret not in Path(cfg["data"]["report"]).read_text()

    # the listing stamps each object (size and ETag): one overwritten under its name, here
    # with garbage, is checked again rather than taken from the check cache
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    listing = list_archive(cfg["data"], stamps=True)
    uris = {u for r in listing.records for u in (r.image_uri, *r.mask_uris)}
    assert set(listing.stamps) == uris and all(":" in v for v in listing.stamps.values())
    victim = remote_splits["val"][0]
    s3.client().put_object(Bucket="medseg-data", Key=victim.image_uri.removeprefix(
        "s3://medseg-data/"), Body=b"not an image any more")
    assert list_archive(cfg["data"], stamps=True).stamps[victim.image_uri] != \
        listing.stamps[victim.image_uri]
    after = load_splits(cfg)
    assert victim.id not in {r.id for v in after.values() for r in v}
    assert data_report(cfg, warn=False)["dropped"] == 1


def _plasma_mib() -> float:
    import re

    import ray
    from ray._private.internal_api import memory_summary

    # this session's cluster by address: "auto" fails when another Ray runs on the machine
    summary = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    m = re.search(r"Plasma memory usage (\d+) MiB", summary)
    return float(m.group(1)) if m else 0.0


def _plasma_growth_behind_stalled_consumer(ds, stall_s: float, stop_above: float = 1e9) -> float:
    """Largest growth (MiB) of the object store, sampled while a consumer holds its first batch
    for `stall_s` (or until the growth passes `stop_above`)."""
    import time

    before = _plasma_mib()
    it = iter(ds.iter_batches(batch_size=8, batch_format="numpy", prefetch_batches=1))
    next(it)
    grown, end = 0.0, time.monotonic() + stall_s
    while time.monotonic() < end and grown <= stop_above:  # the reads go on meanwhile
        time.sleep(0.5)
        grown = max(grown, _plasma_mib() - before)
    for _ in it:
        pass
    del it
    settle = time.monotonic() + 15  # let the pass's blocks be freed before anything else runs
    while _plasma_mib() > before + 2 and time.monotonic() < settle:
        time.sleep(0.25)
    return grown


@pytest.mark.ray
def test_read_ahead_bounds_blocks_waiting_for_a_slow_consumer(ray_cluster, synthetic_archive,
                                                              tmp_path):
    from pipelines.backpressure import cap_read_ahead

    # 256 px rows (256 KiB each) in blocks of 8: 40 blocks of 2 MiB for the whole pass
    cfg = make_cfg(tmp_path, synthetic_archive, "data.image_size=[256,256]",
                   "data.read.batch_size=8", "data.read.read_ahead=1", "data.shuffle=false")
    records = load_splits(cfg)["train"]
    records = (records * (320 // len(records) + 1))[:320]
    capped = _plasma_growth_behind_stalled_consumer(build_dataset(records, cfg, split="train"), 5)
    unbounded = build_dataset(records, cfg, split="train")
    cap_read_ahead(unbounded.context, None)  # Ray Data's budgets off and no cap: all 40 run
    loose = _plasma_growth_behind_stalled_consumer(unbounded, 30, stop_above=40)
    assert loose > 40, loose  # the control: without a bound the pass piles up (80 MiB in all)
    assert capped < 20, (capped, loose)  # 2 task slots + what the iterator holds


def test_reads_show_ray_data_progress_in_the_terminal(synthetic_archive, tmp_path):
    """A user's process (not this test session's cluster) streaming an archive shows Ray
    Data's progress for medseg's read operator (the issue's "progress bars in the terminal")."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    script = (
        "import sys\n"
        f"sys.path.insert(0, {str(root)!r})\n"
        "from pipelines.cluster import connect\n"
        "from pipelines.config import load_config\n"
        "from pipelines.data import build_datasets\n"
        "connect(num_cpus=2)\n"
        f"cfg = load_config(['output_dir={tmp_path}/out', 'data.url={synthetic_archive}',\n"
        "                    'data.image_size=[32,32]', 'data.read.batch_size=2'])\n"
        "n = sum(len(b['label']) for b in build_datasets(cfg)['train'].iter_batches())\n"
        "print('ROWS', n)\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ROWS" in proc.stdout
    # with a terminal Ray Data draws bars; without one (here) it logs the same progress
    assert "ReadMedsegRecords: 0/" in proc.stderr, proc.stderr[-3000:]
    assert "Total Progress:" in proc.stderr and "execution finished" in proc.stderr


@pytest.mark.ray
@pytest.mark.s3
def test_anonymous_read_of_a_public_bucket(ray_cluster, s3, synthetic_archive, tmp_path,
                                           monkeypatch):
    import s3fs

    bucket = "medseg-public"
    s3.upload_dir(synthetic_archive, f"s3://{bucket}/synthetic")
    s3.client().put_bucket_policy(Bucket=bucket, Policy=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": "*",
                       "Action": ["s3:GetObject", "s3:ListBucket"],
                       "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]}]}))
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
              "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    url = f"s3://{bucket}/synthetic"
    endpoint = (f"data.endpoint_url={s3.endpoint}", "data.region=us-east-1")
    # no credentials anywhere (and no filesystem an earlier test cached with some): the archive
    # cannot be listed as a signed user...
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with pytest.raises(Exception, match="(?i)credentials|denied|forbidden"):
            list_archive(make_cfg(tmp_path / "signed", url, *endpoint)["data"])
    finally:  # nor leave one without credentials to later tests
        s3fs.S3FileSystem.clear_instance_cache()
    # ...but `data.anonymous=true` reads it unsigned, with the same records and pixels
    cfg = make_cfg(tmp_path, url, *endpoint, "data.anonymous=true")
    local = make_cfg(tmp_path / "local", synthetic_archive)
    remote_splits, local_splits = load_splits(cfg), load_splits(local)
    assert {k: [r.id for r in v] for k, v in remote_splits.items()} == \
        {k: [r.id for r in v] for k, v in local_splits.items()}
    remote, here = build_datasets(cfg, remote_splits), build_datasets(local, local_splits)
    assert digests(remote["val"]) == digests(here["val"])
    assert data_report(cfg, warn=False)["dropped"] == 0
