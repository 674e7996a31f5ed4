"""medseg_core.splits: perceptual hash, near-duplicate grouping, grouped stratified splits."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from PIL import Image

from medseg_core.layouts import Record, list_records
from medseg_core.splits import (
    assign_folds,
    group_near_duplicates,
    hamming,
    hash_records,
    kfold_split,
    phash,
    ratio_split,
    split_records,
)


def textured(seed: int, size: int = 96) -> np.ndarray:
    """A smooth random grey image (low-frequency structure, like a scan)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 6), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC))


# ----------------------------------------------------------------------------------------------
# phash


def test_phash_stable_under_small_changes_and_far_for_different_images():
    base = textured(0)
    h = phash(base)
    assert 0 <= h < 2**64 and isinstance(h, int)
    assert phash(base.copy()) == h
    rng = np.random.default_rng(1)
    noisy = np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8)
    brighter = np.clip(base.astype(int) + 20, 0, 255).astype(np.uint8)
    resized = np.asarray(Image.fromarray(base).resize((150, 150)))
    rgb = np.repeat(base[:, :, None], 3, axis=2)
    for variant in (noisy, brighter, resized, rgb, base[:, :, None]):
        assert hamming(phash(variant), h) <= 6
    others = [hamming(phash(textured(s)), h) for s in range(1, 21)]
    assert min(others) > 10


def test_phash_rejects_bad_shapes():
    with pytest.raises(ValueError):
        phash(np.zeros((0, 5), np.uint8))
    with pytest.raises(ValueError):
        phash(np.zeros((2, 2, 2, 2), np.uint8))


def test_hamming():
    assert hamming(0, 2**64 - 1) == 64
    assert hamming(0b1011, 0b0001) == 2


# ----------------------------------------------------------------------------------------------
# grouping


def brute_force_groups(hashes: list[int], d: int) -> list[set[int]]:
    """Reference: connected components by repeated set merging, no union-find, no numpy."""
    comps: list[set[int]] = []
    for i, hi in enumerate(hashes):
        linked = [c for c in comps if any(hamming(hi, hashes[j]) <= d for j in c)]
        merged = {i}.union(*linked)
        comps = [c for c in comps if c not in linked] + [merged]
    return comps


@pytest.mark.parametrize("d", [0, 3, 8])
def test_grouping_matches_brute_force(d):
    rng = np.random.default_rng(d)
    seeds = [int(x) for x in rng.integers(0, 2**63, 40)]
    hashes = []
    for s in seeds:  # clusters of hashes that differ in a few random bits
        hashes.append(s)
        for _ in range(int(rng.integers(0, 3))):
            flips = rng.choice(64, size=int(rng.integers(0, 10)), replace=False)
            hashes.append(s ^ int(sum(1 << int(b) for b in flips)))
    groups = group_near_duplicates(hashes, max_distance=d)
    got = {frozenset(i for i, g in enumerate(groups) if g == k) for k in set(groups)}
    assert got == {frozenset(c) for c in brute_force_groups(hashes, d)}
    # ids are 0..G-1 in order of first appearance
    firsts = [groups.index(k) for k in range(max(groups) + 1)]
    assert firsts == sorted(firsts) and groups[0] == 0


def test_grouping_is_transitive():
    a = 0
    chain = [a, a ^ 0b111, a ^ 0b111111, a ^ 0b111111111]  # neighbours 3 bits apart
    assert group_near_duplicates(chain, max_distance=3) == [0, 0, 0, 0]
    assert group_near_duplicates(chain, max_distance=2) == [0, 1, 2, 3]
    assert group_near_duplicates([], 6) == []


# ----------------------------------------------------------------------------------------------
# ratio and k-fold splits


def synthetic_problem(n: int = 1200, seed: int = 0) -> tuple[list[int], list[int]]:
    """Imbalanced labels (60/30/10 %) and groups of size 1-4 with one label each."""
    rng = np.random.default_rng(seed)
    labels, groups, g = [], [], 0
    while len(labels) < n:
        size = int(rng.choice([1, 1, 1, 2, 3, 4]))
        label = int(rng.choice(3, p=[0.6, 0.3, 0.1]))
        labels += [label] * size
        groups += [g] * size
        g += 1
    perm = rng.permutation(len(labels))
    return [labels[i] for i in perm], [groups[i] for i in perm]


def check_partition(parts: dict[str, list[int]], n: int, groups: list[int]) -> None:
    every = [i for v in parts.values() for i in v]
    assert sorted(every) == list(range(n))  # disjoint and covering
    where = {}
    for name, idx in parts.items():
        for i in idx:
            assert where.setdefault(groups[i], name) == name, "group straddles splits"


def test_ratio_split_properties():
    labels, groups = synthetic_problem()
    n = len(labels)
    parts = ratio_split(range(n), labels, groups, seed=3)
    assert set(parts) == {"train", "val", "test"}
    check_partition(parts, n, groups)
    overall = Counter(labels)
    for name, ratio in zip(("train", "val", "test"), (0.8, 0.1, 0.1)):
        idx = parts[name]
        assert abs(len(idx) / n - ratio) < 0.02
        counts = Counter(labels[i] for i in idx)
        for c in overall:  # stratified: each class at roughly the split's ratio
            assert abs(counts[c] / overall[c] - ratio) < 0.05


def test_ratio_split_deterministic_and_seeded():
    labels, groups = synthetic_problem()
    a = ratio_split(range(len(labels)), labels, groups, seed=7)
    assert ratio_split(range(len(labels)), labels, groups, seed=7) == a
    assert ratio_split(range(len(labels)), labels, groups, seed=8) != a


def test_ratio_split_defaults_and_custom_ratios():
    parts = ratio_split(list("abcdefghij") * 10)  # no labels, no groups
    assert [len(parts[k]) for k in ("train", "val", "test")] == [80, 10, 10]
    parts = ratio_split(range(50), ratios=(3, 1, 0))  # normalised: 37.5 / 12.5 / 0
    assert abs(len(parts["train"]) - 37.5) <= 0.5 and parts["test"] == []
    assert len(parts["train"]) + len(parts["val"]) == 50
    with pytest.raises(ValueError):
        ratio_split(range(5), ratios=(0.5, 0.5))
    with pytest.raises(ValueError):
        ratio_split(range(5), labels=[0, 1])


@pytest.mark.parametrize("classes,per_class", [(10, 5), (7, 15), (3, 33)])
def test_ratio_split_spreads_rounding_remainders_over_the_splits(classes, per_class):
    """Equal ratios for val and test: neither collects every class's remainder (10 classes of
    5 gave val 10 and test 0; 7 of 15 gave 14 and 7)."""
    labels = [c for c in range(classes) for _ in range(per_class)]
    n = len(labels)
    sizes = {k: len(v) for k, v in ratio_split(range(n), labels, None, (0.8, 0.1, 0.1)).items()}
    assert sum(sizes.values()) == n
    assert abs(sizes["val"] - sizes["test"]) <= 1, sizes
    for name, ratio in (("train", 0.8), ("val", 0.1), ("test", 0.1)):
        # each class is split on its own: at most one off per class
        assert abs(sizes[name] - ratio * n) < classes, sizes


def test_mixed_label_group_follows_majority():
    # one group of 5 (4 x class 1, 1 x class 0) plus singletons; it must stay whole
    labels = [1, 1, 1, 1, 0] + [0] * 20 + [1] * 20
    groups = [0] * 5 + list(range(1, 41))
    for seed in range(5):
        parts = ratio_split(range(45), labels, groups, seed=seed)
        check_partition(parts, 45, groups)


def test_kfold_properties():
    labels, groups = synthetic_problem(900, seed=1)
    n = len(labels)
    folds = assign_folds(range(n), labels, groups, n_folds=5, seed=2)
    assert sorted(set(folds)) == [0, 1, 2, 3, 4]
    sizes = Counter(folds)
    assert max(sizes.values()) - min(sizes.values()) <= 8
    vals = []
    for k in range(5):
        parts = kfold_split(range(n), labels, groups, n_folds=5, fold=k, seed=2)
        assert set(parts) == {"train", "val"}
        check_partition(parts, n, groups)
        assert parts["val"] == [i for i in range(n) if folds[i] == k]
        vals += parts["val"]
        for c, total in Counter(labels).items():
            in_val = sum(labels[i] == c for i in parts["val"])
            assert abs(in_val / total - 0.2) < 0.05
    assert sorted(vals) == list(range(n))  # every item validated exactly once
    assert kfold_split(range(n), labels, groups, fold=1, seed=2) == kfold_split(
        range(n), labels, groups, fold=1, seed=2
    )
    assert kfold_split(range(n), labels, groups, fold=1, seed=3) != kfold_split(
        range(n), labels, groups, fold=1, seed=2
    )
    with pytest.raises(ValueError):
        kfold_split(range(n), labels, groups, n_folds=5, fold=5)


def test_split_records_uses_hashes():
    recs = [Record(f"r{i}", f"r{i}.png", (), i % 2) for i in range(40)]
    # r0..r9 share one hash: they must land together
    hashes = [0] * 10 + [(i * 0x9E3779B97F4A7C15) % 2**64 for i in range(1, 31)]
    out = split_records(recs, hashes, seed=0)
    homes = {name for name, rs in out.items() for r in rs if int(r.id[1:]) < 10}
    assert len(homes) == 1
    assert sum(len(v) for v in out.values()) == 40
    folds = split_records(recs, hashes, n_folds=4, fold=0)
    assert set(folds) == {"train", "val"}
    assert sum(len(v) for v in folds.values()) == 40


# ----------------------------------------------------------------------------------------------
# shared data: known BUSI duplicates


@pytest.mark.shared_data
def test_busi_known_duplicates_grouped(shared_data):
    records = list_records(str(shared_data / "busi"), "busi").records
    hashes = hash_records(records)
    groups = group_near_duplicates(hashes)
    gid = {r.id: g for r, g in zip(records, groups)}
    assert gid["benign/benign (131)"] == gid["malignant/malignant (51)"]
    assert gid["benign/benign (1)"] == gid["benign/benign (318)"]
    assert gid["benign/benign (1)"] != gid["benign/benign (131)"]
    sizes = Counter(groups)
    assert sum(1 for s in sizes.values() if s >= 2) > 0
    parts = ratio_split(records, [r.label for r in records], groups, seed=0)
    check_partition(parts, len(records), groups)
