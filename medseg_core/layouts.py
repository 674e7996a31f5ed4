"""Archives -> records: find image/mask/label triples in the published dataset layouts.

An archive is a local path, ``file://`` URL or any fsspec URL (``s3://``, ``memory://``...).
Each layout lists the archive once (one ``find`` per directory it reads, never one call per
file), pairs images with masks by name, and reports every problem (image without mask, mask
without image, duplicate id, unknown class, size mismatch) naming the file: ``strict=True``
raises :class:`LayoutError` on the first, ``strict=False`` returns them as :class:`Skipped`.

Record ids are the image path relative to the layout's image directory, without extension
(``benign/benign (1)`` for BUSI), so they are unique, stable and readable. Records are sorted
by id. URIs keep the archive's protocol: an ``s3://`` listing yields ``s3://`` URIs, a plain
path yields plain paths.

Ids, and the paths and reasons of :class:`Skipped`, are always valid Unicode (they end up in
Parquet and JSON): a byte of a local file name that is not UTF-8 (``b"caf\\xe9.png"``) appears
as the escape ``\\xe9`` (see :func:`valid_text`), while ``image_uri`` / ``mask_uris`` keep
the real path to read the file by. A valid name spelling that same escape gets the same id and
is reported as a duplicate.
"""

from __future__ import annotations

import csv
import hashlib
import io as _io
import os
import posixpath
import re
import unicodedata
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from fsspec.implementations.local import LocalFileSystem

from medseg_core.io import (
    DECODE_EXTENSIONS,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    decode_image,
    decode_mask,
    object_fs,
    read_bytes,
    read_image_size,
    read_limited,
)

CLASS_NAMES = ("normal", "benign", "malignant")
IMAGE_EXTENSIONS = DECODE_EXTENSIONS  # a file named otherwise is not taken for an image

_SURROGATE = re.compile("[\ud800-\udfff]")


def _escape_surrogate(m: re.Match) -> str:
    code = ord(m.group())
    # U+DC80..U+DCFF is how os.fsdecode (surrogateescape) carries an undecodable byte
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"


def valid_text(text: str) -> str:
    """``text`` with every lone surrogate written as a backslash escape, so that it encodes as
    UTF-8: a file name byte that is not UTF-8 (``os.fsdecode(b"caf\\xe9")`` is
    ``"caf\\udce9"``) becomes ``\\xe9``. Valid text comes back unchanged. Escaping is per
    character, so a path's parts escape the same alone as in the whole path."""
    return _SURROGATE.sub(_escape_surrogate, text) if _SURROGATE.search(text) else text


class LayoutError(ValueError):
    """The archive does not match its layout; the message names the offending file."""


@dataclass(frozen=True)
class Record:
    """One sample: an image, its mask files (merged by max; none for unlabelled) and a label."""

    id: str
    image_uri: str
    mask_uris: tuple[str, ...] = ()
    label: int = -1

    def to_dict(self) -> dict:
        """Plain dict (mask_uris as a list) for manifests and Ray Data rows."""
        return {
            "id": self.id,
            "image_uri": self.image_uri,
            "mask_uris": list(self.mask_uris),
            "label": self.label,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> Record:
        """Inverse of :meth:`to_dict` (accepts any sequence for mask_uris)."""
        masks = d.get("mask_uris")
        return cls(
            id=str(d["id"]),
            image_uri=str(d["image_uri"]),
            mask_uris=tuple(str(m) for m in (masks if masks is not None else ())),
            label=int(d.get("label", -1)),
        )


@dataclass
class Skipped:
    """A file left out of a non-strict listing, and why (``bad``: bad input, which a strict
    listing refuses; else a file the layout does not read, listed so that it is counted)."""

    path: str
    reason: str
    bad: bool = True

    def __post_init__(self) -> None:
        self.path = valid_text(self.path)
        self.reason = valid_text(self.reason)


# Keys of an fsspec listing entry that change with the file's contents, first found wins:
# S3's ETag, HTTP's ETag, checksums or Last-Modified, modification and creation times.
CHANGE_MARKERS = ("ETag", "etag", "Content-MD5", "Digest", "LastModified", "Last-Modified",
                  "mtime", "last_modified", "created")


@dataclass
class Listing:
    """The result of :func:`list_records`."""

    records: list[Record]
    skipped: list[Skipped] = field(default_factory=list)
    class_names: tuple[str, ...] = ()
    # with list_records(stamps=True): URI -> "size:modification" of every file of the records
    # (mtime locally, the ETag on object storage; only the size, "size:", on a filesystem
    # whose listing has no CHANGE_MARKERS), to tell a file replaced under its name
    stamps: dict[str, str] = field(default_factory=dict)


def files_digest(record: Record, stamps: Mapping[str, str]) -> str:
    """SHA-256 (hex) of a record's files as listed: each URI with its stamp (`Listing.stamps`),
    so that a file replaced under its name, or a record now read from another file, digests
    otherwise. Names need not be valid Unicode."""
    text = "\n".join(f"{u}\t{stamps.get(u, '')}" for u in (record.image_uri, *record.mask_uris))
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


# ----------------------------------------------------------------------------------------------
# Archive access


# folders that operating systems and NAS boxes fill with thumbnails and deleted files
_JUNK_FOLDERS = frozenset({"__MACOSX", "@eaDir", "#recycle", "#snapshot", "$RECYCLE.BIN",
                           "System Volume Information"})


def _is_hidden(rel: str) -> bool:
    return any(p.startswith(".") or p in _JUNK_FOLDERS for p in rel.split("/"))


def _is_image(name: str) -> bool:
    return posixpath.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _join(d: str, name: str) -> str:
    return f"{d}/{name}" if d else name


def _norm_dir(d: str | None) -> str:
    d = (d or "").strip("/")
    return "" if d in ("", ".") else d


def _walk_local(base: str, recursive: bool) -> list[str]:
    """Every file under a local folder, following symlinked folders (fsspec's `find` does
    not, and an archive assembled from symlinked class folders listed as empty), each real
    folder once (a link back to an ancestor is not followed again). A folder that cannot be
    listed (no permission) raises, naming it."""
    seen: set[tuple[int, int]] = set()
    out: list[str] = []

    def unreadable(err: OSError) -> None:
        # a missing root is for the caller to name; a folder that vanished mid-walk holds
        # nothing. Any other folder that cannot be listed would drop its files unseen
        if isinstance(err, (FileNotFoundError, NotADirectoryError)):
            return
        raise type(err)(err.errno, f"{err.strerror}: a folder of the archive that cannot be "
                        "listed is not skipped (its files would be missing unseen)",
                        err.filename) from err

    for folder, subfolders, files in os.walk(base, followlinks=True, onerror=unreadable):
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:
            subfolders.clear()
            continue
        seen.add((st.st_dev, st.st_ino))
        out += [posixpath.join(folder, f) for f in files]
        if not recursive:
            subfolders.clear()
    return out


class _Archive:
    """An fsspec filesystem rooted at the archive URL; builds URIs back with the protocol."""

    def __init__(self, url: str, storage_options: dict | None,
                 max_bytes: int | None = DEFAULT_MAX_BYTES, stamps: bool = False):
        self.url = url
        self.storage_options = storage_options or {}
        self.max_bytes = max_bytes
        self.fs, self.root = object_fs(url, self.storage_options)  # '::' taken literally
        self.keep_protocol = "://" in url
        self.stamps: dict[str, str] | None = {} if stamps else None  # full path -> stamp
        self.saw_files = False  # `find` returned a non-hidden file

    def path(self, sub: str = "") -> str:
        sub = _norm_dir(sub)
        if not sub:
            return self.root
        return f"{self.root.rstrip('/')}/{sub}"

    def uri(self, path: str) -> str:
        return self.fs.unstrip_protocol(path) if self.keep_protocol else path

    def find(self, sub: str = "", recursive: bool = True) -> list[tuple[str, str]]:
        """(path relative to ``sub``, full path) for every non-hidden file under ``sub``.

        The relative path, which ids are made of, is `valid_text`; the full path is the real
        one, to read the file by."""
        base = self.path(sub)
        if isinstance(self.fs, LocalFileSystem):
            found = _walk_local(base, recursive)
            if self.stamps is not None:
                for p in found:
                    try:
                        st = os.stat(p)
                    except OSError:  # gone, or a dangling link: its read will say so
                        continue
                    self.stamps[p] = f"{st.st_size}:{st.st_mtime_ns}"
        else:
            try:
                infos = self.fs.find(base, maxdepth=None if recursive else 1, withdirs=False,
                                     detail=True)
            except (FileNotFoundError, NotADirectoryError):
                infos = {}
            found = list(infos)
            if self.stamps is not None:
                for p, info in infos.items():
                    changed = next((info[k] for k in CHANGE_MARKERS if info.get(k)), "")
                    self.stamps[p] = f"{info.get('size')}:{changed}"
        prefix = base.rstrip("/") + "/"
        out = []
        for p in found:
            if not p.startswith(prefix):
                continue
            rel = valid_text(p[len(prefix) :])
            if not rel or rel.endswith("/"):  # an object store's folder marker ("incoming/")
                continue
            if not _is_hidden(rel):
                out.append((rel, p))
        out.sort()
        self.saw_files = self.saw_files or bool(out)
        return out

    def find_many(self, subs: Sequence[str]) -> dict[str, list[tuple[str, str]]]:
        """Listings for several directories, listing only the outermost ones."""
        result: dict[str, list[tuple[str, str]]] = {}
        for sub in sorted({_norm_dir(s) for s in subs}, key=len):
            outer = next(
                (o for o in result if o == "" or sub.startswith(o + "/")),
                None,
            )
            if outer is None:
                result[sub] = self.find(sub)
            else:
                pre = valid_text(sub[len(outer) :].lstrip("/") if outer else sub) + "/"
                result[sub] = [(r[len(pre) :], p) for r, p in result[outer] if r.startswith(pre)]
        return result

    def read(self, ref: str) -> bytes:
        """Bytes of a file given relative to the archive, or as an absolute path/URL."""
        if "://" in ref or ref.startswith("/"):
            return read_bytes(ref, self.storage_options, self.max_bytes)
        return read_limited(self.fs, self.path(ref), self.max_bytes, ref)


_Problems = list[Skipped]


# ----------------------------------------------------------------------------------------------
# Layouts


class Layout:
    """Base class: ``scan`` returns records (unsorted) and problems found while pairing."""

    name = ""

    def scan(self, arc: _Archive) -> tuple[list[Record], _Problems]:
        raise NotImplementedError

    @property
    def class_names(self) -> tuple[str, ...]:
        return ()


def _label_for(cls: str, class_names: Sequence[str]) -> int:
    if cls in class_names:
        return list(class_names).index(cls)
    lowered = [c.lower() for c in class_names]
    return lowered.index(cls.lower()) if cls.lower() in lowered else -1


class BusiLayout(Layout):
    """``<class>/<name>.png`` + ``<class>/<name>_mask.png`` (+ ``_mask_1``...), label from folder.

    ``class_names=None`` takes the sorted class folder names.
    """

    name = "busi"
    _MASK = re.compile(r"(?P<stem>.+)_mask(?:_(?P<k>\d+))?", re.DOTALL)  # names may hold "\n"

    def __init__(
        self,
        class_names: Sequence[str] | None = CLASS_NAMES,
        require_masks: bool = True,
    ):
        self._class_names = tuple(class_names) if class_names is not None else None
        self.require_masks = require_masks

    @property
    def class_names(self) -> tuple[str, ...]:
        return self._class_names or ()

    def scan(self, arc: _Archive) -> tuple[list[Record], _Problems]:
        problems: _Problems = []
        images: dict[str, list[str]] = defaultdict(list)
        masks: dict[str, list[tuple[int, str]]] = defaultdict(list)
        for rel, full in arc.find():
            if not _is_image(rel):
                continue
            stem = posixpath.splitext(rel)[0]
            d, base = posixpath.split(stem)
            m = self._MASK.fullmatch(base)
            if m:
                masks[posixpath.join(d, m["stem"])].append((int(m["k"] or 0), full))
            else:
                images[stem].append(full)
        if self._class_names is None:
            self._class_names = tuple(sorted({k.split("/")[0] for k in images if "/" in k}))
        records = []
        for key, paths in images.items():
            image = paths[0]
            if "/" not in key:
                problems.append(Skipped(arc.uri(image), "image is not inside a class folder"))
                continue
            cls = key.split("/")[0]
            label = _label_for(cls, self._class_names)
            if label < 0:
                problems.append(
                    Skipped(
                        arc.uri(image),
                        f"class folder '{cls}' is not one of class_names {self._class_names}",
                    )
                )
                continue
            found = [p for _, p in sorted(masks.get(key, []))]
            if not found and self.require_masks:
                expected = posixpath.basename(key) + "_mask.png"
                problems.append(Skipped(arc.uri(image), f"no mask (expected '{expected}')"))
                continue
            records.append(Record(key, arc.uri(image), tuple(arc.uri(p) for p in found), label))
            for dup in paths[1:]:
                problems.append(
                    Skipped(arc.uri(dup), f"duplicate id '{key}' (also {arc.uri(image)})")
                )
        for key, found in masks.items():
            if key not in images:
                for _, p in found:
                    problems.append(
                        Skipped(arc.uri(p), f"mask without image (expected '{key}.png')")
                    )
        return records, problems


class Dsb2018Layout(Layout):
    """Data Science Bowl 2018: ``<id>/images/<id>.png`` + ``<id>/masks/*.png`` (merged)."""

    name = "dsb2018"

    def __init__(self, require_masks: bool = True):
        self.require_masks = require_masks

    def scan(self, arc: _Archive) -> tuple[list[Record], _Problems]:
        problems: _Problems = []
        images: dict[str, list[str]] = defaultdict(list)
        masks: dict[str, list[str]] = defaultdict(list)
        for rel, full in arc.find():
            parts = rel.split("/")
            if len(parts) != 3 or not _is_image(rel):
                continue
            if parts[1] == "images":
                images[parts[0]].append(full)
            elif parts[1] == "masks":
                masks[parts[0]].append(full)
        records = []
        for key, paths in images.items():
            found = sorted(masks.get(key, []))
            if not found and self.require_masks:
                problems.append(Skipped(arc.uri(paths[0]), f"no mask files in '{key}/masks/'"))
                continue
            records.append(Record(key, arc.uri(paths[0]), tuple(arc.uri(p) for p in found)))
            for dup in paths[1:]:
                problems.append(
                    Skipped(arc.uri(dup), f"duplicate id '{key}': more than one file in images/")
                )
        for key, found in masks.items():
            if key not in images:
                for p in found:
                    problems.append(
                        Skipped(arc.uri(p), f"mask without image (no '{key}/images/' file)")
                    )
        return records, problems


class FolderLayout(Layout):
    """Generic: ``<image_dir>/<id>.<ext>`` + ``<mask_dir>/<id><mask_suffix>.<ext>``.

    Directories are relative to the archive URL and searched recursively (an id keeps its
    sub-folders). ``labels_csv`` (relative path or URL) maps ids to labels: ``id_column`` (name
    or index, default the first column) and ``label_column`` (name or index). With no
    ``label_column``, a two-column CSV uses its second column and a wider one is read as one-hot
    columns (ISIC task 3 style), the column names becoming the class names. Label values may be
    ints or class names (``class_names``, default the sorted distinct names). Images missing
    from the CSV get label -1; they and the CSV's ids that match no image are named in a
    warning. Ids and file names are compared in Unicode NFC.
    """

    name = "folder"
    _ignore_stems: tuple[str, ...] = ()

    def __init__(
        self,
        image_dir: str = "images",
        mask_dir: str | None = "masks",
        mask_suffix: str = "",
        labels_csv: str | None = None,
        id_column: str | int | None = None,
        label_column: str | int | None = None,
        class_names: Sequence[str] | None = None,
        require_masks: bool = True,
    ):
        self.image_dir = _norm_dir(image_dir)
        self.mask_dir = None if mask_dir is None else _norm_dir(mask_dir)
        self.mask_suffix = mask_suffix
        if self.mask_dir == self.image_dir and not mask_suffix:
            raise ValueError("mask_suffix is required when image_dir and mask_dir are the same")
        self.labels_csv = labels_csv
        self.id_column = id_column
        self.label_column = label_column
        self._class_names = tuple(class_names) if class_names is not None else None
        self.require_masks = require_masks and self.mask_dir is not None

    @property
    def class_names(self) -> tuple[str, ...]:
        return self._class_names or ()

    def _under(self, rel_dir: str, inner: str | None) -> bool:
        """Whether the file (relative to image_dir) lies inside the nested ``inner`` dir."""
        if inner is None or inner == self.image_dir:
            return False
        pre = valid_text(inner[len(self.image_dir) :].lstrip("/") if self.image_dir else inner)
        return rel_dir == pre or rel_dir.startswith(pre + "/")

    def scan(self, arc: _Archive) -> tuple[list[Record], _Problems]:
        problems: _Problems = []
        dirs = [self.image_dir] + ([self.mask_dir] if self.mask_dir is not None else [])
        listing = arc.find_many(dirs)
        nested_masks = self.mask_dir is not None and (
            self.image_dir == "" or self.mask_dir.startswith(self.image_dir + "/")
        )
        same_dir = self.mask_dir == self.image_dir
        sfx = self.mask_suffix

        images: dict[str, list[str]] = defaultdict(list)
        for rel, full in listing[self.image_dir]:
            if not _is_image(rel):
                continue
            stem = posixpath.splitext(rel)[0]
            if nested_masks and self._under(posixpath.dirname(rel), self.mask_dir):
                continue
            if same_dir and stem.endswith(sfx):
                continue
            if stem.endswith(self._ignore_stems):
                continue
            images[stem].append(full)

        masks: dict[str, list[str]] = defaultdict(list)
        if self.mask_dir is not None:
            nested_images = not same_dir and (
                self.mask_dir == "" or self.image_dir.startswith(self.mask_dir + "/")
            )
            img_pre = valid_text(self.image_dir[len(self.mask_dir) :].lstrip("/")) + "/"
            for rel, full in listing[self.mask_dir]:
                if not _is_image(rel) or (nested_images and rel.startswith(img_pre)):
                    continue
                stem = posixpath.splitext(rel)[0]
                if not stem.endswith(sfx):
                    if not same_dir:
                        problems.append(
                            Skipped(arc.uri(full), f"mask name does not end with '{sfx}'")
                        )
                    continue
                masks[stem[: len(stem) - len(sfx)] if sfx else stem].append(full)

        labels, label_problems = self._read_labels(arc)
        problems += label_problems
        records = []
        used: set[str] = set()
        unlabelled: list[str] = []
        for key, paths in images.items():
            found = sorted(masks.get(key, []))
            if not found and self.require_masks:
                expected = _join(self.mask_dir or "", f"{key}{sfx}.png")
                problems.append(Skipped(arc.uri(paths[0]), f"no mask (expected '{expected}')"))
                continue
            if len(found) > 1:
                problems.append(
                    Skipped(
                        arc.uri(found[1]),
                        f"duplicate mask for id '{key}' (also {arc.uri(found[0])})",
                    )
                )
                found = found[:1]
            label_key = next((k for k in (_nfc(key), _nfc(posixpath.basename(key)))
                              if k in labels), None)
            if label_key is None:
                unlabelled.append(key)
            else:
                used.add(label_key)
            label = -1 if label_key is None else labels[label_key]
            records.append(Record(key, arc.uri(paths[0]), tuple(arc.uri(p) for p in found), label))
            for dup in paths[1:]:
                problems.append(
                    Skipped(arc.uri(dup), f"duplicate id '{key}' (also {arc.uri(paths[0])})")
                )
        for key, found in masks.items():
            if key not in images:
                for p in found:
                    expected = _join(self.image_dir, key + ".*")
                    problems.append(Skipped(arc.uri(p), f"mask without image (no '{expected}')"))
        if self.labels_csv:
            _warn_unmatched_labels(self.labels_csv, sorted(set(labels) - used), unlabelled)
        return records, problems

    def _column(self, header: list[str], col: str | int, csv_uri: str) -> int:
        if isinstance(col, int):
            if not -len(header) <= col < len(header):
                raise LayoutError(f"{csv_uri}: column {col} out of range ({len(header)} columns)")
            return col % len(header)
        if col not in header:
            raise LayoutError(f"{csv_uri}: no column '{col}' (columns: {header})")
        return header.index(col)

    def _read_labels(self, arc: _Archive) -> tuple[dict[str, int], _Problems]:
        if not self.labels_csv:
            return {}, []
        ref = self.labels_csv
        csv_uri = ref if ("://" in ref or ref.startswith("/")) else arc.uri(arc.path(ref))
        try:
            text = arc.read(ref).decode("utf-8-sig")
        except FileNotFoundError as e:
            raise LayoutError(f"{csv_uri}: labels CSV not found") from e
        rows = [r for r in csv.reader(_io.StringIO(text)) if any(c.strip() for c in r)]
        if not rows:
            raise LayoutError(f"{csv_uri}: labels CSV is empty")
        header = [h.strip() for h in rows[0]]
        id_col = self._column(header, self.id_column if self.id_column is not None else 0, csv_uri)
        one_hot: list[int] = []
        label_col = -1
        if self.label_column is not None:
            label_col = self._column(header, self.label_column, csv_uri)
        elif len(header) == 2:
            label_col = 1 - id_col
        else:
            if self._class_names is not None:
                one_hot = [self._column(header, c, csv_uri) for c in self._class_names]
            else:
                one_hot = [i for i in range(len(header)) if i != id_col]
                self._class_names = tuple(header[i] for i in one_hot)

        problems: _Problems = []
        raw: dict[str, str | list[str]] = {}
        for line, row in enumerate(rows[1:], start=2):
            row = row + [""] * (len(header) - len(row))
            key = row[id_col].strip()
            if _is_image(key):
                key = posixpath.splitext(key)[0]
            key = _nfc(key)  # as file names are matched: macOS writes them decomposed (NFD)
            if key in raw:
                problems.append(Skipped(csv_uri, f"line {line}: duplicate id '{key}'"))
                continue
            raw[key] = [row[i] for i in one_hot] if one_hot else row[label_col].strip()

        labels: dict[str, int] = {}
        if one_hot:
            for key, vals in raw.items():
                try:
                    v = np.array([float(x or 0) for x in vals])
                except ValueError:
                    problems.append(Skipped(csv_uri, f"id '{key}': non-numeric one-hot {vals}"))
                    continue
                labels[key] = int(v.argmax()) if v.max() > 0 else -1
            return labels, problems

        names = [v for v in raw.values() if v and not _is_int(v)]
        if self._class_names is None:
            self._class_names = tuple(sorted(set(names)))
        for key, v in raw.items():
            if not v:
                labels[key] = -1
            elif _is_int(v):
                label = int(float(v))
                if self._class_names and not -1 <= label < len(self._class_names):
                    problems.append(Skipped(csv_uri, f"id '{key}': label {label} is not an "
                                            f"index of class_names {self._class_names}"))
                    continue
                labels[key] = label
            else:
                label = _label_for(v, self._class_names)
                if label < 0:
                    problems.append(
                        Skipped(csv_uri, f"id '{key}': unknown class '{v}' {self._class_names}")
                    )
                    continue
                labels[key] = label
        return labels, problems


def _nfc(text: str) -> str:
    """Unicode NFC: 'é' as one code point, whether a file system or a CSV wrote it as two."""
    return unicodedata.normalize("NFC", text)


def _warn_unmatched_labels(csv_ref: str, unused: Sequence[str], unlabelled: Sequence[str]
                           ) -> None:
    """Name the labels CSV's ids that match no image and the images it gives no label (label
    -1: the classifier stage leaves them out), a few of each."""
    def few(names: Sequence[str]) -> str:
        return ", ".join(repr(n) for n in names[:5]) + (", ..." if len(names) > 5 else "")

    if unused:
        warnings.warn(f"{csv_ref}: {len(unused)} labelled id(s) match no image of the archive "
                      f"({few(unused)}); their labels are unused", stacklevel=3)
    if unlabelled:
        warnings.warn(f"{csv_ref}: {len(unlabelled)} image(s) have no label there "
                      f"({few(unlabelled)}); they get label -1 and the classifier stage leaves "
                      "them out", stacklevel=3)


def _is_int(v: str) -> bool:
    try:
        return float(v).is_integer()
    except ValueError:
        return False


class Isic2018Layout(FolderLayout):
    """ISIC 2018 task 1: ``ISIC_x.jpg`` in ``image_dir`` + ``ISIC_x_segmentation.png``.

    Defaults are the official archive folder names. ``labels_csv`` optionally points at the
    task 3 ground truth (``image,MEL,NV,BCC,AKIEC,BKL,DF,VASC`` one-hot rows); images not in
    it keep label -1. ``*_superpixels.png`` files of older releases are ignored.
    """

    name = "isic2018"
    _ignore_stems = ("_superpixels",)

    def __init__(
        self,
        image_dir: str = "ISIC2018_Task1-2_Training_Input",
        mask_dir: str = "ISIC2018_Task1_Training_GroundTruth",
        mask_suffix: str = "_segmentation",
        labels_csv: str | None = None,
        id_column: str | int | None = None,
        label_column: str | int | None = None,
        class_names: Sequence[str] | None = None,
        require_masks: bool = True,
    ):
        super().__init__(
            image_dir=image_dir,
            mask_dir=mask_dir,
            mask_suffix=mask_suffix,
            labels_csv=labels_csv,
            id_column=id_column,
            label_column=label_column,
            class_names=class_names,
            require_masks=require_masks,
        )


class ImagesLayout(Layout):
    """A folder of images without masks (bulk inference); ids are relative paths sans extension."""

    name = "images"

    def __init__(self, recursive: bool = True):
        self.recursive = recursive

    def scan(self, arc: _Archive) -> tuple[list[Record], _Problems]:
        problems: _Problems = []
        seen: dict[str, str] = {}
        records = []
        for rel, full in arc.find(recursive=self.recursive):
            if not _is_image(rel):
                # a DICOM study or a half-copied `.png.part` vanished from every count
                ext = posixpath.splitext(rel)[1] or "no extension"
                problems.append(Skipped(arc.uri(full), f"not an image file by its extension "
                                        f"({ext}): not processed", bad=False))
                continue
            key = posixpath.splitext(rel)[0]
            if key in seen:
                problems.append(Skipped(arc.uri(full), f"duplicate id '{key}' (also {seen[key]})"))
                continue
            seen[key] = arc.uri(full)
            records.append(Record(key, arc.uri(full)))
        return records, problems


LAYOUTS: dict[str, type[Layout]] = {
    "busi": BusiLayout,
    "isic2018": Isic2018Layout,
    "dsb2018": Dsb2018Layout,
    "folder": FolderLayout,
    "images": ImagesLayout,
}


# ----------------------------------------------------------------------------------------------
# Listing and loading


def _size_problems(arc: _Archive, records: list[Record]) -> dict[str, Skipped]:
    """Header-only size check of every image against its masks; problem per record id."""

    def size(uri: str) -> tuple[int, int]:
        return read_image_size(uri, arc.storage_options)

    def check(rec: Record) -> Skipped | None:
        try:
            want = size(rec.image_uri)
            for m in rec.mask_uris:
                got = size(m)
                if got != want:
                    return Skipped(
                        m,
                        f"mask is {got[0]}x{got[1]} but image {rec.image_uri} is "
                        f"{want[0]}x{want[1]}",
                    )
        except ImageDecodeError as e:
            return Skipped(rec.image_uri, f"unreadable header: {e}")
        return None

    todo = [r for r in records if r.mask_uris]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(check, todo))
    return {r.id: p for r, p in zip(todo, results) if p is not None}


def check_found(arc: _Archive, layout: str, problems: Sequence[Skipped],
                allow_empty: bool = False) -> None:
    """Raise LayoutError naming the URL (and the layout, and the files it saw and skipped)
    for a listing of `arc` that found no record: the archive does not exist (nor any object
    under the prefix), the layout recognised none of the files found, or (unless
    `allow_empty`) there are no files."""
    url = valid_text(arc.url)
    files = None
    if not arc.saw_files and not problems:
        try:
            # isfile, not `not isdir`: s3fs takes a prefix holding only its folder marker
            # ("incoming/") for no folder, though it exists
            exists, is_file = arc.fs.exists(arc.root), arc.fs.isfile(arc.root)
        except OSError:
            exists, is_file = False, False
        if not exists:
            raise LayoutError(f"{url}: the archive does not exist (no such folder, or no object "
                              "under that prefix): check the URL")
        if is_file:
            raise LayoutError(f"{url}: the archive is a file, not a folder of images")
        # the layout looked only where its files belong (isic2018's folders, a folder layout's
        # image_dir, the top level without `recursive`): files elsewhere mean a wrong layout
        files = arc.find()
        if not files:
            if allow_empty:
                return
            raise LayoutError(f"{url}: no files found for layout '{layout}' (the folder is "
                              "empty)")
    first = min(problems, key=lambda s: (s.path, s.reason)) if problems else None
    n_files = len(arc.find() if files is None else files)  # listed again on error paths only
    raise LayoutError(f"{url}: layout '{layout}' found no record among the "
                      f"{n_files} file(s) found, {len(problems)} skipped by the layout"
                      + (f" (first: {first.path}: {first.reason})" if first else "")
                      + "; check `layout` (and its options) against the archive's folders")


def list_records(
    url: str,
    layout: str,
    *,
    storage_options: dict | None = None,
    strict: bool = True,
    check_sizes: bool = False,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    stamps: bool = False,
    allow_empty: bool = False,
    **options,
) -> Listing:
    """List the records of the archive at ``url`` in the named layout (see :data:`LAYOUTS`).

    ``options`` go to the layout class. ``check_sizes`` reads image and mask headers (not
    pixels) and treats a size mismatch as a problem. With ``strict`` the first problem raises
    :class:`LayoutError`; otherwise problems come back in ``Listing.skipped``. ``max_bytes``
    bounds the listing files a layout reads (a labels CSV); None: no bound. ``stamps`` fills
    ``Listing.stamps`` from the listing itself (a ``stat`` per local file, nothing more on
    object storage).

    A listing without a single record raises :class:`LayoutError` whatever ``strict`` (see
    :func:`check_found`): the archive does not exist, or the layout recognised none of its
    files; an existing folder without files only with ``allow_empty=False`` (with True, an
    empty listing: nothing arrived yet).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout '{layout}', expected one of {sorted(LAYOUTS)}")
    lay = LAYOUTS[layout](**options)
    arc = _Archive(url, storage_options, max_bytes, stamps=stamps)
    records, problems = lay.scan(arc)
    if not records:
        check_found(arc, layout, problems, allow_empty)

    # Duplicate ids across the whole listing (layouts already catch same-name files).
    by_id: dict[str, Record] = {}
    for rec in sorted(records, key=lambda r: (r.id, r.image_uri)):
        if rec.id in by_id:
            problems.append(
                Skipped(rec.image_uri, f"duplicate id '{rec.id}' (also {by_id[rec.id].image_uri})")
            )
        else:
            by_id[rec.id] = rec
    records = list(by_id.values())

    if check_sizes:
        bad = _size_problems(arc, records)
        problems += bad.values()
        records = [r for r in records if r.id not in bad]

    problems.sort(key=lambda s: (s.path, s.reason))
    bad = [p for p in problems if p.bad]
    if strict and bad:
        first = bad[0]
        more = f" (and {len(bad) - 1} more problems)" if len(bad) > 1 else ""
        raise LayoutError(f"{first.path}: {first.reason}{more}")
    by_uri = {arc.uri(p): v for p, v in (arc.stamps or {}).items()}
    kept = {u: by_uri[u] for r in records for u in (r.image_uri, *r.mask_uris) if u in by_uri}
    return Listing(records=records, skipped=problems, class_names=lay.class_names, stamps=kept)


def decode_record(
    record: Record | Mapping,
    image_bytes: bytes,
    mask_bytes: Sequence[bytes] = (),
    *,
    channels: int = 3,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    threshold: int = 127,
    keep_grey: bool = False,
) -> dict:
    """Decode already-read bytes of a record into ``{"id", "image", "mask", "label"}``
    (``keep_grey``: see ``io.decode_image``)."""
    rec = record if isinstance(record, Record) else Record.from_dict(record)
    image = decode_image(image_bytes, channels, max_pixels=max_pixels, name=rec.image_uri,
                         keep_grey=keep_grey)
    mask = decode_masks(rec, mask_bytes, image.shape[:2], threshold=threshold,
                        max_pixels=max_pixels)
    return {"id": rec.id, "image": image, "mask": mask, "label": int(rec.label)}


def decode_masks(
    record: Record,
    mask_bytes: Sequence[bytes],
    shape: tuple[int, int],
    *,
    threshold: int = 127,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """The union of a record's decoded masks as uint8 HxW in {0, 1} (zeros when it has none);
    a mask that is not `shape` (the image's H, W) raises LayoutError naming both files."""
    h, w = shape
    mask = np.zeros((h, w), dtype=np.uint8)
    for uri, data in zip(record.mask_uris, mask_bytes, strict=True):
        m = decode_mask(data, threshold=threshold, max_pixels=max_pixels, name=uri)
        if m.shape != (h, w):
            raise LayoutError(
                f"{uri}: mask is {m.shape[1]}x{m.shape[0]} but image {record.image_uri} "
                f"is {w}x{h}"
            )
        np.maximum(mask, m, out=mask)
    return mask


def load_record(
    record: Record | Mapping,
    *,
    storage_options: dict | None = None,
    channels: int = 3,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    threshold: int = 127,
    keep_grey: bool = False,
) -> dict:
    """Read and decode a record: image uint8 HxWxC, mask uint8 HxW {0,1} (max over mask files,
    zeros when there are none), label int. Raises ImageDecodeError or LayoutError naming the file
    (ImageTooLargeError for a file over ``max_bytes``). ``keep_grey``: see ``io.decode_image``.
    """
    rec = record if isinstance(record, Record) else Record.from_dict(record)
    image_bytes = read_bytes(rec.image_uri, storage_options, max_bytes)
    mask_bytes = [read_bytes(u, storage_options, max_bytes) for u in rec.mask_uris]
    return decode_record(rec, image_bytes, mask_bytes, channels=channels, max_pixels=max_pixels,
                         threshold=threshold, keep_grey=keep_grey)
