"""Shared fixtures: one local Ray cluster and one real S3-compatible server per test session,
the shared public datasets (skipped when ../shared is absent), a small synthetic archive."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(Path(__file__).parent))

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or a clean skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def synthetic_archive(tmp_path_factory) -> str:
    """A small synthetic archive in the BUSI layout (5 images per class, 64 px)."""
    from medseg_core.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("synthetic")
    return generate_dataset(str(root / "archive"), n_per_class=5, size=64, seed=0)


@pytest.fixture(scope="session")
def s3():
    """A real S3-compatible object store on 127.0.0.1 (SeaweedFS, else moto server)."""
    from s3server import start_s3

    server = start_s3()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session: 2 CPUs, no dashboard."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        from pipelines.cluster import connect

        connect(num_cpus=2, dashboard=False)  # as the entry points start one: this tree on the path, Ray env
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


@pytest.fixture
def fake_native_bf16(monkeypatch):
    """`fake_native_bf16(native)`: make torch's CPU probes report native bf16 (AVX512-BF16,
    AMX) or not, whatever this CPU has (`medseg_core.precision.native_bf16` reads them)."""
    import torch

    def patch(native: bool) -> None:
        for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
            monkeypatch.setattr(torch.cpu, probe, lambda: native, raising=False)

    return patch
