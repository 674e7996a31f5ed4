import io
import json
import uuid

import fsspec
import pytest
import torch
import yaml
from torch import nn

from medseg_core.checkpoint import (
    BUNDLE_KEYS,
    TRAIN_STATE_FILE,
    Bundle,
    BundleError,
    load_bundle,
    load_train_state,
    make_bundle_config,
    save_bundle,
    save_train_state,
)
from medseg_core.models import build_model

SEG_MODEL = {"name": "unet_bn", "widths": [4, 8, 16], "in_channels": 3}


def _config(model_cfg=SEG_MODEL, task="segmentation", **extra):
    return make_bundle_config(
        model_cfg,
        task=task,
        input_size=(32, 32),
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        **extra,
    )


def _trained_model(cfg=SEG_MODEL) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # non-default weights and BN statistics
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        model.train()(torch.randn(4, 3, 32, 32))
    return model.eval()


def _check_round_trip(url, storage_options=None):
    model = _trained_model()
    metrics = {"dice": 0.8, "epoch": 3}
    returned = save_bundle(url, model, _config(), metrics, storage_options=storage_options)
    bundle = load_bundle(returned, storage_options=storage_options)
    assert isinstance(bundle, Bundle)
    assert bundle.uri == returned
    assert bundle.metrics == metrics
    assert set(BUNDLE_KEYS) <= set(bundle.config)
    assert bundle.config["model"] == SEG_MODEL
    assert bundle.config["input_size"] == [32, 32]
    assert bundle.version
    assert not bundle.model.training
    x = torch.randn(2, 3, 27, 41)
    with torch.no_grad():
        assert torch.equal(bundle.model(x), model(x))
    return bundle


def test_round_trip_local(tmp_path):
    bundle = _check_round_trip(str(tmp_path / "bundle"))
    files = sorted(p.name for p in (tmp_path / "bundle").iterdir())
    assert files == ["config.yaml", "metrics.json", "version", "weights.pt"]
    # default version: "<timestamp>-<10 hex digits of the weights' sha256>"
    stamp, digest = bundle.version.split("-")
    assert stamp.endswith("Z") and len(digest) == 10
    int(digest, 16)


def test_a_failed_save_leaves_the_old_bundle(tmp_path):
    """A config value YAML cannot write fails the save before the old bundle is touched."""
    from pathlib import PurePosixPath

    url = str(tmp_path / "bundle")
    save_bundle(url, _trained_model(), _config(), version="good-v1")
    with pytest.raises(yaml.YAMLError):
        save_bundle(url, _trained_model(), {**_config(), "source": PurePosixPath("/x")},
                    version="v2")
    assert load_bundle(url).version == "good-v1"


def test_round_trip_file_url_and_memory(tmp_path):
    _check_round_trip(f"file://{tmp_path}/b2/")
    _check_round_trip(f"memory://bundles/{uuid.uuid4().hex}")


def test_explicit_version_overwrite_and_same_weights_same_digest(tmp_path):
    url = str(tmp_path / "b")
    model = _trained_model()
    save_bundle(url, model, _config(), version="v1")
    assert load_bundle(url).version == "v1"
    save_bundle(url, model, _config(threshold=0.3), {"dice": 0.9}, version="v2")
    bundle = load_bundle(url)
    assert bundle.version == "v2" and bundle.config["threshold"] == 0.3
    assert bundle.metrics == {"dice": 0.9}
    a = save_bundle(str(tmp_path / "c"), model, _config())
    b = save_bundle(str(tmp_path / "d"), model, _config())
    assert load_bundle(a).version.split("-")[1] == load_bundle(b).version.split("-")[1]


def test_classifier_and_deep_supervision_bundles(tmp_path):
    cls_cfg = {"name": "classifier", "widths": [4, 8], "num_classes": 3}
    model = build_model(cls_cfg).eval()
    url = save_bundle(
        str(tmp_path / "cls"),
        model,
        _config(
            cls_cfg,
            task="classification",
            threshold=None,
            class_names=("normal", "benign", "malignant"),
        ),
    )
    bundle = load_bundle(url)
    assert bundle.config["class_names"] == ["normal", "benign", "malignant"]
    image, mask = torch.randn(1, 3, 20, 20), torch.ones(1, 1, 20, 20)
    assert torch.equal(bundle.model(image, mask), model(image, mask))
    ds_cfg = {"name": "improved_unet", "widths": [4, 8, 16], "deep_supervision": True}
    url = save_bundle(str(tmp_path / "ds"), build_model(ds_cfg), _config(ds_cfg))
    out = load_bundle(url).model(torch.randn(1, 3, 16, 16))
    assert isinstance(out, torch.Tensor)  # eval mode: main output only


def test_wrapped_model_saves_plain_keys(tmp_path):
    class Wrapper(nn.Module):  # stands in for DistributedDataParallel
        def __init__(self, module):
            super().__init__()
            self.module = module

    model = _trained_model()
    url = save_bundle(str(tmp_path / "w"), Wrapper(model), _config())
    state = torch.load(tmp_path / "w" / "weights.pt", weights_only=True)
    assert set(state) == set(model.state_dict())
    x = torch.randn(1, 3, 16, 16)
    assert torch.equal(load_bundle(url).model(x), model(x))


def test_save_validates_config(tmp_path):
    model = _trained_model()
    config = _config()
    del config["mean"]
    with pytest.raises(ValueError, match="mean"):
        save_bundle(str(tmp_path / "x"), model, config)
    with pytest.raises(ValueError, match="task"):
        save_bundle(str(tmp_path / "x"), model, _config(task="detection"))
    wrong = _config({"name": "unet_bn", "widths": [4, 8, 32]})
    with pytest.raises(ValueError, match="does not match"):
        save_bundle(str(tmp_path / "x"), model, wrong)
    assert not (tmp_path / "x").exists()


def test_incomplete_or_missing_bundles_are_refused(tmp_path):
    url = save_bundle(str(tmp_path / "b"), _trained_model(), _config())
    (tmp_path / "b" / "version").unlink()  # as if the writer died before finishing
    with pytest.raises(BundleError, match="version") as err:
        load_bundle(url)
    assert url in str(err.value)
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(str(tmp_path / "nowhere"))


def test_bundle_meta_of_a_missing_bundle_or_of_another_task(tmp_path):
    """read_bundle_meta said "has no version" for a directory that does not exist; jobs given
    a bundle of the wrong task (a classifier as the segmenter) failed on every image."""
    from medseg_core.checkpoint import read_bundle_meta

    with pytest.raises(BundleError, match=r"model bundle \S*nowhere does not exist"):
        read_bundle_meta(str(tmp_path / "nowhere"))
    url = save_bundle(str(tmp_path / "b"), _trained_model(), _config())
    (tmp_path / "b" / "version").unlink()
    with pytest.raises(BundleError, match="has no version"):
        read_bundle_meta(url)
    from medseg_core.checkpoint import check_bundle_task

    seg = save_bundle(str(tmp_path / "s"), _trained_model(), _config())
    assert check_bundle_task(seg, "segmentation", "x.segmenter")[1]["task"] == "segmentation"
    with pytest.raises(BundleError, match=r"^x.classifier: model bundle \S+/s is a "
                       r"'segmentation' bundle; x.classifier needs a 'classification' one$"):
        check_bundle_task(seg, "classification", "x.classifier")
    with pytest.raises(BundleError, match=r"^x.segmenter: model bundle \S*nowhere does not exist"):
        check_bundle_task(str(tmp_path / "nowhere"), "segmentation", "x.segmenter")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("config.yaml", b"model: [unclosed", "YAML"),
        ("config.yaml", b"- just a list", "mapping"),
        ("config.yaml", b"model: {name: unet}\ntask: segmentation\n", "missing keys"),
        ("metrics.json", b"{not json", "JSON"),
        ("weights.pt", b"\x00garbage", "weights.pt"),
        # the message ended in ": " for an empty file
        ("weights.pt", b"", r"weights.pt of model bundle \S+ \(0 bytes: truncated, or not a "
                            r"torch weights file\): \S"),
        # loaded, then every mask came out empty or full
        ("config.yaml", b"model: {name: unet_bn, widths: [4, 8, 16]}\ntask: segmentation\n"
                        b"input_size: [32, 32]\nin_channels: 3\nmean: [0.5, 0.5, 0.5]\n"
                        b"std: [0, 0, 0]\nthreshold: 0.5\nclass_names: null\ninference: {}\n",
         r"std must be 1 or in_channels=3 finite numbers > 0, got \[0, 0, 0\]"),
        ("config.yaml", b"model: {name: unet_bn, widths: [4, 8, 16]}\ntask: segmentation\n"
                        b"input_size: [32, 32]\nin_channels: 3\nmean: .nan\n"
                        b"std: [0.25, 0.25, 0.25]\nthreshold: 0.5\nclass_names: null\n"
                        b"inference: {}\n", "mean must be 1 or in_channels=3 finite numbers"),
        ("config.yaml", b"model: {name: unet_bn, widths: [4, 8, 16]}\ntask: segmentation\n"
                        b"input_size: [32, 32]\nin_channels: 3\nmean: [0.5, 0.5, 0.5]\n"
                        b"std: [0.25, 0.25, 0.25]\nthreshold: 5.0\nclass_names: null\n"
                        b"inference: {}\n", "threshold must be strictly between 0 and 1"),
        # failed at the first prediction, in a convolution
        ("config.yaml", b"model: {name: unet_bn, widths: [4, 8, 16], in_channels: 3}\n"
                        b"task: segmentation\ninput_size: [32, 32]\nin_channels: 1\nmean: 0.5\n"
                        b"std: 0.25\nthreshold: 0.5\nclass_names: null\ninference: {}\n",
         "in_channels=1 but its model takes in_channels=3"),
    ],
)
def test_garbled_files_are_reported(tmp_path, name, content, message):
    url = save_bundle(str(tmp_path / "b"), _trained_model(), _config())
    (tmp_path / "b" / name).write_bytes(content)
    with pytest.raises(BundleError, match=message) as err:
        load_bundle(url)
    assert url in str(err.value)


def test_missing_file_and_foreign_weights(tmp_path):
    url = save_bundle(str(tmp_path / "b"), _trained_model(), _config())
    (tmp_path / "b" / "metrics.json").unlink()
    # not "metrics.json ... is not valid JSON: model bundle ... has no metrics.json"
    with pytest.raises(BundleError, match=r"^model bundle \S+ has no metrics.json$"):
        load_bundle(url)
    url = save_bundle(str(tmp_path / "c"), _trained_model(), _config())
    other = build_model({"name": "unet", "widths": [4, 8, 16]}).state_dict()
    buffer = io.BytesIO()
    torch.save(other, buffer)
    (tmp_path / "c" / "weights.pt").write_bytes(buffer.getvalue())
    with pytest.raises(BundleError, match="do not fit"):
        load_bundle(url)


class _NotATensor:
    pass


def test_weights_are_loaded_with_weights_only(tmp_path):
    url = save_bundle(str(tmp_path / "b"), _trained_model(), _config())
    buffer = io.BytesIO()
    torch.save({"payload": _NotATensor()}, buffer)  # arbitrary pickled object
    (tmp_path / "b" / "weights.pt").write_bytes(buffer.getvalue())
    with pytest.raises(BundleError, match="weights.pt"):
        load_bundle(url)


def test_bundle_files_are_plain_text(tmp_path):
    url = f"memory://bundles/{uuid.uuid4().hex}"
    save_bundle(
        url, _trained_model(), _config(), {"dice": 0.5, "hd95": float("inf")}, version="abc"
    )
    fs = fsspec.filesystem("memory")
    path = url[len("memory://") :]
    config = yaml.safe_load(fs.cat_file(f"{path}/config.yaml"))
    assert config["mean"] == [0.5, 0.5, 0.5] and config["inference"]["mode"] == "resize"
    assert json.loads(fs.cat_file(f"{path}/metrics.json"))["hd95"] == float("inf")
    assert fs.cat_file(f"{path}/version").decode().strip() == "abc"


@pytest.mark.parametrize("where", ["local", "memory"])
def test_optimizer_state_round_trip_beside_a_bundle(tmp_path, where):
    url = str(tmp_path / "b") if where == "local" else f"memory://ckpt/{uuid.uuid4().hex}"
    model = _trained_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    for _ in range(2):
        optimizer.zero_grad()
        model.train()(torch.randn(2, 3, 32, 32)).square().mean().backward()
        optimizer.step()
    save_train_state(url, {"optimizer": optimizer.state_dict(), "note": "e1"})
    save_bundle(url, model, _config(), version="e1")
    assert load_bundle(url).version == "e1"  # the extra file does not disturb the bundle

    state = load_train_state(url)
    assert state["note"] == "e1"
    other = _trained_model()
    restored = torch.optim.AdamW(other.parameters(), lr=0.5)
    restored.load_state_dict(state["optimizer"])
    assert restored.param_groups[0]["lr"] == 0.01
    for p, q in zip(model.parameters(), other.parameters()):
        a, b = optimizer.state[p], restored.state[q]
        assert float(b["step"]) == 2.0
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(a[key], b[key]), key
        assert b["exp_avg_sq"].abs().sum() > 0


def test_optimizer_state_absent_or_unsafe(tmp_path):
    url = save_bundle(str(tmp_path / "b"), _trained_model(), _config())
    assert load_train_state(url) is None  # a bundle saved without one
    buffer = io.BytesIO()
    torch.save({"payload": _NotATensor()}, buffer)  # arbitrary pickled object
    (tmp_path / "b" / TRAIN_STATE_FILE).write_bytes(buffer.getvalue())
    with pytest.raises(BundleError, match=TRAIN_STATE_FILE):
        load_train_state(url)


@pytest.mark.s3
def test_object_store_paths_holding_glob_characters_are_taken_literally(s3, tmp_path,
                                                                         monkeypatch):
    """fsspec's `rm` reads `*`, `?` and `[` as a glob: on S3 a second bundle saved into
    `trial[1]` failed (its `version` "not found"), and clearing `pk*x` deleted the sibling
    folders its pattern matched. Each is checked against a real S3 server."""
    from medseg_core.io import remove_path
    from pipelines.runlog import copy_dir
    from pipelines.segment_batch import Output

    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    s3.create_bucket("medseg-glob")
    base = f"s3://medseg-glob/{uuid.uuid4().hex[:6]}"
    fs = fsspec.filesystem("s3")
    for name in ("pkAx", "pk-other-x", "pk*x", "nightly-1", "nightly*"):
        fs.pipe_file(f"{base}/{name}/results/part-0.json".removeprefix("s3://"), b"{}")
    remove_path(fs, f"{base}/pk*x/results/part-0.json".removeprefix("s3://"))
    Output(f"{base}/nightly*").delete_tree("results")
    left = sorted(p.split("/", 2)[2] for p in fs.find(base.removeprefix("s3://")))
    assert left == ["nightly-1/results/part-0.json", "pk-other-x/results/part-0.json",
                    "pkAx/results/part-0.json"]

    model, config = _trained_model(), _config()
    for run in (1, 2):  # the second save replaces the first's version file
        save_bundle(f"{base}/trial[1]/best", model, config, version=f"v{run}")
    assert load_bundle(f"{base}/trial[1]/best").version == "v2"
    local = tmp_path / "bundle"
    save_bundle(str(local), model, config, version="v3")
    for _ in (1, 2):  # training's copy of the best bundle: staged, then over the old one
        copy_dir(str(local), f"{base}/exp*[1]/best")
    assert load_bundle(f"{base}/exp*[1]/best").version == "v3"
    assert not fs.exists(f"{base}/exp*[1]/best.new".removeprefix("s3://"))
    assert load_bundle(f"{base}/trial[1]/best").version == "v2"
