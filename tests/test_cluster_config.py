"""cluster.yaml must pass Ray's own cluster-launcher schema, as `ray up` checks it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def load() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_validates_against_ray_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(load()))


def test_schema_rejects_a_broken_config():
    """The check above could fail: an unknown key at the top level is refused."""
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    cfg = load()
    cfg["gpu_nodes"] = 3
    with pytest.raises(jsonschema.ValidationError):
        validate_config(cfg)


def test_gpu_workers_autoscale_from_zero_and_install_the_project():
    cfg = load()
    gpu = cfg["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert cfg["head_node_type"] == "head"
    assert any("pip install" in c and "-e ." in c for c in cfg["setup_commands"])
    assert "." in cfg["file_mounts"].values()
