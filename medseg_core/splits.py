"""Deterministic, leakage-free splits: near-duplicate grouping, ratio and k-fold splits.

Near-duplicates (the same scan saved twice, re-crops, different masks of one image) are found
with a 64-bit DCT perceptual hash and grouped by Hamming distance (union-find, so grouping is
transitive). Splits assign whole groups, stratified by class (a group's class is the majority
label of its members, ties to the smaller label), so no group straddles two splits. Everything
is a pure function of the inputs and the seed.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from medseg_core.io import DEFAULT_MAX_PIXELS, decode_image, read_bytes

SPLIT_NAMES = ("train", "val", "test")
_MASK64 = (1 << 64) - 1
_HASH_SIZE = 32
_LOW = 8


def _dct_matrix(n: int) -> np.ndarray:
    """DCT-II basis (unnormalised; a constant scale does not change hash bits)."""
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    return np.cos(np.pi * (2 * x + 1) * k / (2 * n))


_DCT = _dct_matrix(_HASH_SIZE)
_BIT_WEIGHTS = [1 << (63 - i) for i in range(64)]


def phash(image: np.ndarray) -> int:
    """64-bit perceptual hash: grey, 32x32 Lanczos resize, 2-D DCT, 8x8 low frequencies > median.

    ``image`` is uint8 HxW or HxWxC (C = 1, 3 or 4; colour goes to luma). Bit 63 is the DC term.
    """
    a = np.asarray(image)
    if a.ndim == 3:
        if a.shape[2] == 1:
            a = a[:, :, 0]
        else:
            a = a[:, :, :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"phash needs an HxW or HxWxC image, got shape {np.shape(image)}")
    grey = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
    small = np.asarray(
        grey.resize((_HASH_SIZE, _HASH_SIZE), Image.Resampling.LANCZOS), dtype=np.float64
    )
    low = (_DCT @ small @ _DCT.T)[:_LOW, :_LOW].ravel()
    bits = low > np.median(low)
    return sum(w for w, b in zip(_BIT_WEIGHTS, bits) if b)


def hash_records(
    records: Sequence,
    *,
    storage_options: dict | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    workers: int = 4,
) -> list[int]:
    """phash of every record's image (``Record``s or dicts with ``image_uri``), in order."""

    def one(rec: object) -> int:
        uri = rec["image_uri"] if isinstance(rec, Mapping) else rec.image_uri
        data = read_bytes(uri, storage_options)
        # JPEG decoders may downscale while decoding; the hash only needs 32x32.
        img = decode_image(data, 1, max_pixels=max_pixels, name=uri, draft=(128, 128))
        return phash(img)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(one, records))


def hamming(a: int, b: int) -> int:
    """Number of differing bits between two 64-bit hashes."""
    return ((a ^ b) & _MASK64).bit_count()


def _popcount(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
    return table[x.view(np.uint8)].reshape(*x.shape, 8).sum(axis=-1)


def group_near_duplicates(hashes: Sequence[int], max_distance: int = 6) -> list[int]:
    """Group id per item: items linked (transitively) by Hamming distance <= ``max_distance``.

    Group ids are 0..G-1 in order of each group's first item. O(n^2) bit operations, done in
    numpy blocks: fine for tens of thousands of hashes.
    """
    h = np.array([int(x) & _MASK64 for x in hashes], dtype=np.uint64)
    n = h.size
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    block = 512
    for start in range(0, n, block):
        rows = h[start : start + block]
        dist = _popcount(rows[:, None] ^ h[None, :])
        ii, jj = np.nonzero(dist <= max_distance)
        ii = ii + start
        for i, j in zip(ii.tolist(), jj.tolist()):
            if j > i:
                ri, rj = find(i), find(j)
                if ri != rj:
                    parent[max(ri, rj)] = min(ri, rj)

    ids: dict[int, int] = {}
    return [ids.setdefault(find(i), len(ids)) for i in range(n)]


def _prepare(
    items: Sequence, labels: Sequence[int] | None, groups: Sequence[int] | None
) -> tuple[int, list[int], dict[int, list[int]]]:
    n = len(items)
    labels = [-1] * n if labels is None else [int(v) for v in labels]
    groups = list(range(n)) if groups is None else [int(g) for g in groups]
    if len(labels) != n or len(groups) != n:
        raise ValueError(f"items ({n}), labels ({len(labels)}) and groups ({len(groups)}) differ")
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    return n, labels, members


def _strata(
    labels: list[int], members: dict[int, list[int]], rng: np.random.Generator
) -> list[list[list[int]]]:
    """Groups by majority class, each stratum shuffled by ``rng`` then stably largest-first."""
    by_class: dict[int, list[list[int]]] = defaultdict(list)
    for g in sorted(members):
        counts = Counter(labels[i] for i in members[g])
        top = max(counts.values())
        by_class[min(c for c, k in counts.items() if k == top)].append(members[g])
    strata = []
    for c in sorted(by_class):
        gs = by_class[c]
        order = rng.permutation(len(gs))
        shuffled = [gs[i] for i in order]
        shuffled.sort(key=len, reverse=True)
        strata.append(shuffled)
    return strata


def ratio_split(
    items: Sequence,
    labels: Sequence[int] | None = None,
    groups: Sequence[int] | None = None,
    ratios: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> dict[str, list[int]]:
    """Indices for ``train``/``val``/``test`` in proportions ``ratios``, per class, whole groups.

    Within each class, groups go (largest first, otherwise in seeded random order) to the
    split furthest below its target count, so proportions are met as closely as groups allow.
    A tie goes to the split furthest below its target over all classes, so that no split
    collects every class's rounding remainder (10 classes of 5 at 0.8/0.1/0.1 gave 40/10/0).
    """
    if len(ratios) != 3 or min(ratios) < 0 or sum(ratios) <= 0:
        raise ValueError(f"ratios must be three non-negative numbers, got {tuple(ratios)}")
    r = np.asarray(ratios, dtype=np.float64) / float(sum(ratios))
    n, labels, members = _prepare(items, labels, groups)
    rng = np.random.default_rng(seed)
    out: dict[str, list[int]] = {k: [] for k in SPLIT_NAMES}
    overall_target, overall = r * n, np.zeros(3)
    for stratum in _strata(labels, members, rng):
        target = r * sum(len(g) for g in stratum)
        have = np.zeros(3)
        for g in stratum:
            # Largest deficit in the class wins; ties go to the largest deficit overall, then
            # to the larger ratio, then to the first split.
            k = max(range(3), key=lambda s: (target[s] - have[s],
                                             overall_target[s] - overall[s], r[s], -s))
            have[k] += len(g)
            overall[k] += len(g)
            out[SPLIT_NAMES[k]].extend(g)
    return {k: sorted(v) for k, v in out.items()}


def assign_folds(
    items: Sequence,
    labels: Sequence[int] | None = None,
    groups: Sequence[int] | None = None,
    n_folds: int = 5,
    seed: int = 0,
) -> list[int]:
    """Fold index (0..n_folds-1) per item, stratified by class, whole groups per fold."""
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    n, labels, members = _prepare(items, labels, groups)
    rng = np.random.default_rng(seed)
    fold_of = [0] * n
    total = [0] * n_folds
    for stratum in _strata(labels, members, rng):
        local = [0] * n_folds
        for g in stratum:
            k = min(range(n_folds), key=lambda f: (local[f], total[f], f))
            local[k] += len(g)
            total[k] += len(g)
            for i in g:
                fold_of[i] = k
    return fold_of


def kfold_split(
    items: Sequence,
    labels: Sequence[int] | None = None,
    groups: Sequence[int] | None = None,
    n_folds: int = 5,
    fold: int = 0,
    seed: int = 0,
) -> dict[str, list[int]]:
    """Indices for ``train``/``val`` of fold ``fold`` of a stratified, grouped k-fold split."""
    if not 0 <= fold < n_folds:
        raise ValueError(f"fold must be in [0, {n_folds}), got {fold}")
    folds = assign_folds(items, labels, groups, n_folds=n_folds, seed=seed)
    return {
        "train": [i for i, f in enumerate(folds) if f != fold],
        "val": [i for i, f in enumerate(folds) if f == fold],
    }


def split_records(
    records: Sequence,
    hashes: Sequence[int] | None = None,
    *,
    ratios: Sequence[float] = (0.8, 0.1, 0.1),
    n_folds: int | None = None,
    fold: int = 0,
    seed: int = 0,
    max_distance: int = 6,
) -> dict[str, list]:
    """Split records (``Record``s or dicts with ``label``) into lists of records.

    Near-duplicates are grouped when ``hashes`` (one phash per record) is given. With
    ``n_folds`` the result is ``train``/``val`` of that fold, otherwise ``train``/``val``/``test``.
    """
    labels = [int(r["label"] if isinstance(r, Mapping) else r.label) for r in records]
    groups = None if hashes is None else group_near_duplicates(hashes, max_distance)
    if n_folds is not None:
        idx = kfold_split(records, labels, groups, n_folds=n_folds, fold=fold, seed=seed)
    else:
        idx = ratio_split(records, labels, groups, ratios=ratios, seed=seed)
    return {k: [records[i] for i in v] for k, v in idx.items()}
