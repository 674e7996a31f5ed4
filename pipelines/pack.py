"""Pack an archive into sharded Parquet, so a million-file archive is listed once, not per run.

    python pipelines/pack.py data=busi_full pack.out=./outputs/packed/busi_full
    python pipelines/pack.py data=busi_full pack.out=s3://bucket/packed/busi_full_256 \\
        pack.resize_to=[256,256] pack.encoding=png          # pre-resized, for GPU feeding

Output (`pack.out`, a path or any fsspec URL):

    manifest.json            format, source archive, class names, shards (path, rows, row groups),
                             files skipped while packing (with reasons)
    shard-<pack id>-00000.parquet ...  one row per record, rows in record-id order,
                             `pack.row_group_rows`
                             rows per row group (the unit a reader fetches)

Columns: id, image (encoded bytes), mask (encoded bytes; null when the record has no mask),
label, source (the original image URI), mask_sources, width and height (original size), phash
(the near-duplicate hash the splits use, so splitting a packed archive decodes nothing),
encoding and shape (the stored image's [h, w, c]). Encodings:

- ``file`` (default): the original image bytes, untouched; the mask file's bytes (a merged PNG
  when a record has several mask files). Decodes to exactly the raw archive's pixels.
  Merged and resized masks are thresholded at ``data.mask_threshold`` while packing (recorded
  in the manifest) and stored as 0/255.
- ``png``: image and mask resized to ``pack.resize_to`` (the same Resize as training) and stored
  as PNG: a fraction of the decode work per epoch.
- ``raw``: the resized uint8 arrays as raw bytes (zstd-compressed column): no decode at all.

Every record is decoded once while packing (validation and phash); bad files are left out,
named in a warning and in the manifest (or fail the pack with ``data.strict=true``). The manifest
is deleted first and written last, so a pack that did not finish (a first one, or one
rewriting an older pack) is never mistaken for a complete one. Shards
are packed in parallel by Ray Data (one task per shard, progress bar on) or, with
``pack.backend=local``, in this process.

Reading: set ``data.url`` to the pack and ``data.layout=packed`` (a manifest at the URL is also
detected); see `pipelines/conf/data/busi_full_packed.yaml`.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra
import numpy as np
from omegaconf import DictConfig

from medseg_core.io import encode_mask_png, encode_png, is_local, remove_path
from medseg_core.layouts import Record, decode_record
from medseg_core.transforms import Resize, to_channels
from pipelines import CONF_DIR
from pipelines.cluster import check_shared_paths, connect, disconnect, task_slots
from pipelines.config import check_whole, explained_storage_errors, reported_refusals, resolve
from pipelines.data import (
    BAD_INPUT_ERRORS,
    MANIFEST_NAME,
    PACKED_FORMAT,
    PROGRESS_EVERY_S,
    REPORT_NAME,
    BadRecordError,
    EnvCredentials,
    Problem,
    _check_no_credentials,
    _fs,
    _max_bytes,
    _max_pixels,
    check_decode_settings,
    fetch_many,
    image_phash,
    list_archive,
    read_settings,
    record_bytes,
    record_problems,
    report_options,
    report_path,
    storage_options,
    task_credentials,
)

ENCODINGS = ("file", "png", "raw")


def _schema():
    import pyarrow as pa

    return pa.schema([
        ("id", pa.string()), ("image", pa.binary()), ("mask", pa.binary()),
        ("label", pa.int64()), ("source", pa.string()), ("mask_sources", pa.list_(pa.string())),
        ("width", pa.int32()), ("height", pa.int32()), ("phash", pa.uint64()),
        ("encoding", pa.string()), ("shape", pa.list_(pa.int32())),
    ])


def _encode_row(rec: Record, blobs: list[bytes], spec: dict[str, Any]) -> dict[str, Any]:
    """Validate (full decode), hash and encode one record; raises on bad input."""
    max_pixels = spec["max_pixels"]
    channels = int(spec["channels"])
    sample = decode_record(rec, blobs[0], blobs[1:], channels=channels, max_pixels=max_pixels,
                           threshold=spec["mask_threshold"], keep_grey=True)
    h, w = sample["mask"].shape
    row: dict[str, Any] = {
        "id": rec.id, "label": int(rec.label), "source": rec.image_uri,
        "mask_sources": list(rec.mask_uris), "width": int(w), "height": int(h),
        "phash": image_phash(blobs[0], rec.image_uri, max_pixels),
        "encoding": spec["encoding"],
    }
    if spec["encoding"] == "file":
        row["image"] = blobs[0]
        if not rec.mask_uris:
            row["mask"] = None
        elif len(rec.mask_uris) == 1:
            row["mask"] = blobs[1]
        else:
            row["mask"] = encode_mask_png(sample["mask"])
        row["shape"] = [int(h), int(w), channels]
        return row
    resized = Resize(spec["resize_to"])(sample)
    image, mask = to_channels(resized["image"], channels), resized["mask"]
    row["shape"] = [int(v) for v in image.shape]
    if spec["encoding"] == "png":
        row["image"] = encode_png(image, compress_level=int(spec["compress_level"]))
        row["mask"] = encode_mask_png(mask) if rec.mask_uris else None
    else:
        row["image"] = np.ascontiguousarray(image).tobytes()
        row["mask"] = np.ascontiguousarray(mask, dtype=np.uint8).tobytes() if rec.mask_uris \
            else None
    return row


def pack_shard(index: int, records: list[Record], spec: dict[str, Any]) -> dict[str, Any]:
    """Write shard `index` (records in order, row groups of spec["row_group_rows"]).

    Returns {"index", "path", "rows", "row_groups", "skipped": [problem dicts]}.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    # named per pack run: a rerun never rewrites a shard that a reader (or a row-group cache)
    # may hold from the old pack
    name = f"shard-{spec['pack_id']}-{index:05d}.parquet"
    url = f"{spec['out'].rstrip('/')}/{name}"
    so, creds = spec["storage_options"], spec["credentials"]
    out_fs, out_path = _fs(url, spec["out_storage_options"], creds)
    if is_local(out_fs):
        out_fs.makedirs(out_fs._parent(out_path), exist_ok=True)
    schema = _schema()
    compression = {"image": "zstd" if spec["encoding"] == "raw" else "none",
                   "mask": "zstd" if spec["encoding"] == "raw" else "none"}
    compression.update({c: "snappy" for c in schema.names if c not in compression})
    skipped: list[dict[str, Any]] = []
    groups: list[int] = []
    step = int(spec["row_group_rows"])
    with out_fs.open(out_path, "wb") as f, \
            pq.ParquetWriter(f, schema, compression=compression) as writer:
        for start in range(0, len(records), step):
            chunk = records[start:start + step]
            blobs = fetch_many([u for r in chunk for u in (r.image_uri, *r.mask_uris)], so,
                               creds, int(spec["io_threads"]), spec["max_bytes"])
            rows = []
            for rec in chunk:
                try:
                    rows.append(_encode_row(rec, record_bytes(rec, blobs), spec))
                except BAD_INPUT_ERRORS as e:
                    p = Problem.of("pack", e, rec)
                    if spec["strict"]:
                        raise BadRecordError(f"{p.path}: {p.reason} (data.strict=true)") from e
                    skipped.append({"stage": "pack", "path": p.path, "reason": p.reason,
                                    "id": rec.id})
            if rows:
                table = pa.Table.from_pylist(rows, schema=schema)
                writer.write_table(table, row_group_size=len(rows))
                groups.append(len(rows))
    return {"index": index, "path": name, "rows": sum(groups), "row_groups": groups,
            "skipped": skipped}


def _pack_batch(batch: dict[str, np.ndarray], spec: dict[str, Any]) -> dict[str, np.ndarray]:
    """map_batches UDF: pack the shards in the batch; returns one summary (JSON) per shard."""
    out = []
    for index, recs in zip(batch["index"], batch["records"]):
        records = [Record.from_dict(d) for d in json.loads(str(recs))]
        out.append(json.dumps(pack_shard(int(index), records, spec)))
    return {"summary": np.array(out, dtype=object)}


def _out_options(cfg: dict[str, Any], out: str) -> dict | None:
    """fsspec options of pack.out: pack.storage_options, else the data config's S3 endpoint,
    region and anonymous settings (no credentials either way: they come from the environment)."""
    so = dict(cfg["pack"].get("storage_options") or {})
    _check_no_credentials(so, "pack.storage_options")
    if so:
        return so
    return storage_options({k: v for k, v in cfg["data"].items() if k != "storage_options"},
                           url=out)


def pack_archive(cfg: dict[str, Any]) -> dict[str, Any]:
    """Pack `cfg["data"]`'s archive to `cfg["pack"]["out"]`; returns the manifest."""
    data, pack = cfg["data"], cfg["pack"]
    out = str(pack["out"]).rstrip("/")
    resize_to = pack.get("resize_to")
    encoding = str(pack.get("encoding") or ("png" if resize_to else "file"))
    if encoding not in ENCODINGS:
        raise ValueError(f"pack.encoding must be one of {ENCODINGS}, got {encoding!r}")
    if encoding == "file" and resize_to:
        raise ValueError("pack.encoding=file stores the original bytes, which cannot be "
                         f"resized to pack.resize_to={list(resize_to)}: use png or raw (or "
                         "leave pack.encoding unset)")
    if encoding != "file" and not resize_to:
        raise ValueError(f"pack.encoding={encoding} needs pack.resize_to=[h, w]")
    shard_size, group_rows = pack.get("shard_size", 512), pack.get("row_group_rows", 32)
    check_whole(shard_size, "pack.shard_size", 1)
    check_whole(group_rows, "pack.row_group_rows", 1)
    # all checked before the old pack's manifest goes: a bad setting must not destroy it
    if resize_to and not (len(resize_to) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in resize_to)):
        raise ValueError(f"pack.resize_to must be null or [height, width] of whole numbers >= 1, "
                         f"got {resize_to}")
    check_whole(pack.get("compress_level", 1), "pack.compress_level", 0, 9)
    check_decode_settings(data)
    report_options(cfg)  # credentials in it refused now, not after packing
    read = read_settings(data)
    backend = pack.get("backend", "ray")
    if backend not in ("ray", "local"):
        raise ValueError(f"pack.backend must be ray or local, got {backend!r}")
    strict = bool(data.get("strict", False))
    listing = list_archive(data, strict=strict)
    problems = [Problem("listing", s.path, s.reason) for s in listing.skipped]
    records = listing.records
    so = storage_options(data)
    spec = {
        "out": out, "encoding": encoding, "pack_id": uuid.uuid4().hex[:8],
        "resize_to": [int(v) for v in resize_to] if resize_to else None,
        "row_group_rows": group_rows,
        "compress_level": int(pack.get("compress_level", 1)),
        "channels": int(data.get("channels", 3)), "max_pixels": _max_pixels(data),
        "max_bytes": _max_bytes(data),
        "mask_threshold": int(data.get("mask_threshold", 127)), "strict": strict, "storage_options": so,
        "credentials": (task_credentials(data, str(data["url"])) or task_credentials(data, out)
                        or EnvCredentials()),
        "out_storage_options": _out_options(cfg, out),
        "io_threads": int(read["io_threads"]),
    }
    # the old manifest goes first: a pack that does not finish is never taken for complete;
    # and the old pack's report, which named files this pack may not leave out
    mfs, mpath = _fs(f"{out}/{MANIFEST_NAME}", spec["out_storage_options"], spec["credentials"])
    for old in (mpath, f"{mpath.rsplit('/', 1)[0]}/{REPORT_NAME}"):
        if mfs.exists(old):
            remove_path(mfs, old)
    shards = [records[i:i + shard_size] for i in range(0, len(records), shard_size)]
    t0 = time.time()
    if backend == "local":
        summaries, last, packed = [], t0, 0
        for i, shard in enumerate(shards):
            summaries.append(pack_shard(i, shard, spec))
            packed += len(shard)
            if time.time() - last >= PROGRESS_EVERY_S and i + 1 < len(shards):
                last = time.time()
                print(f"[pack] {i + 1}/{len(shards)} shards, {packed} records", flush=True)
    else:
        import ray

        connect()
        check_shared_paths({"pack.out": out}, {"data.url": str(data["url"])},
                           {"CPU": float(read["num_cpus"])}, min(len(shards), task_slots(
                               float(read["num_cpus"]))), "the pack tasks")
        items = [{"index": i, "records": json.dumps([r.to_dict() for r in s])}
                 for i, s in enumerate(shards)]
        ds = ray.data.from_items(items, override_num_blocks=max(1, len(items))).map_batches(
            _pack_batch, batch_size=1, batch_format="numpy", fn_kwargs={"spec": spec},
            num_cpus=float(read["num_cpus"]))
        summaries = [json.loads(r["summary"]) for r in ds.iter_rows()]
        summaries.sort(key=lambda s: s["index"])
    for s in summaries:
        problems += [Problem(p["stage"], p["path"], p["reason"], p["id"]) for p in s["skipped"]]
    manifest = {
        "format": PACKED_FORMAT, "version": 1,
        "source": {"url": str(data["url"]), "layout": data["layout"],
                   "options": dict(data.get("options") or {}), "name": data.get("name")},
        "class_names": list(listing.class_names or data.get("class_names") or []),
        "encoding": encoding, "resize_to": spec["resize_to"], "channels": spec["channels"],
        "mask_threshold": spec["mask_threshold"], "shard_size": shard_size, "row_group_rows": spec["row_group_rows"],
        "records": sum(s["rows"] for s in summaries),
        "shards": [{"path": s["path"], "rows": s["rows"], "row_groups": s["row_groups"]}
                   for s in summaries if s["rows"]],
        "skipped": [{"stage": p.stage, "path": p.path, "reason": p.reason, "id": p.id}
                    for p in sorted(problems, key=lambda p: p.path)],
        "seconds": round(time.time() - t0, 3),
    }
    with mfs.open(mpath, "w") as f:
        json.dump(manifest, f, indent=1)
    _remove_stale_shards(mfs, mpath.rsplit("/", 1)[0], {s["path"] for s in manifest["shards"]})
    if problems:
        if report_path(cfg) and not report_options(cfg):  # written as the pack is
            cfg = {**cfg, "data": {**data, "report_storage_options": _out_options(
                cfg, str(report_path(cfg)))}}
        record_problems(cfg, problems)
    return manifest


def _remove_stale_shards(fs: Any, folder: str, keep: set[str]) -> None:
    """Delete the shards of earlier packs (or of a pack killed midway) that the manifest just
    written does not list (``keep``: its shard names): Parquet readers of the folder would take
    them for records."""
    for entry in fs.ls(folder, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("shard-") and name.endswith(".parquet") and name not in keep:
            remove_path(fs, entry)


@hydra.main(config_path=CONF_DIR, config_name="pack", version_base=None)
def main(cfg: DictConfig) -> None:
    with reported_refusals():
        plain = resolve(cfg)
        if not plain["pack"].get("out"):
            raise SystemExit("set pack.out=<path or URL> for the packed archive")
        with explained_storage_errors():
            m = pack_archive(plain)
    disconnect()  # Ray's held-back worker lines before the closing line, not after it
    n_skip = len(m["skipped"])
    print(f"packed {m['records']} records into {len(m['shards'])} shard(s) at "
          f"{plain['pack']['out']} in {m['seconds']:.1f}s ({m['encoding']}"
          f"{', ' + 'x'.join(map(str, m['resize_to'])) if m['resize_to'] else ''})"
          f"{f'; {n_skip} file(s) skipped, see manifest.json' if n_skip else ''}", flush=True)
    if n_skip:
        warnings.warn(f"{n_skip} bad file(s) left out: "
                      + ", ".join(s["path"] for s in m["skipped"][:5]), stacklevel=1)


if __name__ == "__main__":
    main()

