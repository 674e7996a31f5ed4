"""pipelines.config: what every entry point resolves its Hydra config with."""

from __future__ import annotations

import os
import re
import sys

import pytest

from pipelines.config import load_config


@pytest.mark.parametrize("config_name, overrides, key", [
    ("config", ["data=dsb2018"], "data.url"),
    ("segment_batch", ["input=arc", "bundles.segmenter=seg"], "output"),
    ("segment_batch", ["input=arc", "output=out"], "bundles.segmenter"),
])
def test_a_required_setting_left_unset_is_named(config_name, overrides, key):
    """`???` used to resolve to a path called `???` (an empty listing, or outputs written
    to ./???/)."""
    with pytest.raises(ValueError, match=rf"required setting\(s\) not given: {key}"):
        load_config(overrides, config_name=config_name)


def test_local_paths_are_made_absolute_for_ray_workers(tmp_path, monkeypatch):
    """Ray workers run in their own directory: every path setting is absolute, URLs stay."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(["train.classifier_masks.segmenter=runs/a/segmenter/best"])
    assert cfg["train"]["classifier_masks"]["segmenter"] == str(
        tmp_path / "runs" / "a" / "segmenter" / "best")
    job = load_config(["input=s3://bucket/in", "output=out", "bundles.segmenter=seg"],
                      config_name="segment_batch")
    assert job["input"] == "s3://bucket/in" and job["output"] == str(tmp_path / "out")
    assert job["bundles"] == {"segmenter": str(tmp_path / "seg"), "classifier": None}
    packed = load_config(["pack.out=p"], config_name="pack")
    assert os.path.isabs(packed["pack"]["out"]) and os.path.isabs(packed["data"]["url"])
    # `~` as a shell expands it: a folder named `~` appeared in the working directory (and
    # `rm -rf ~` is how a user would remove it)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home = load_config(["output_dir='~/out'", "data.url='~/arc'"])  # Hydra needs the quotes
    assert home["output_dir"] == str(tmp_path / "home" / "out")
    assert home["data"]["url"] == str(tmp_path / "home" / "arc")
    assert home["data"]["report"].startswith(str(tmp_path / "home" / "out") + "/")
    from pipelines import local_dir

    assert local_dir("~/out/hydra") == str(tmp_path / "home" / "out" / "hydra")


def test_boolean_settings_spelt_as_words_are_refused_and_other_words_kept():
    """Hydra reads `overwrite=no` as the string "no", which acts as true: refused for the
    settings that are booleans, while names, paths and env_vars may hold any word."""
    from pipelines.config import load_config

    for overrides, name in ((["data.shuffle=off"], "config"), (["trainer.cache_data=yes"], "config"),
                            (["data.strict='false'"], "config"),
                            (["overwrite=no", "input=x", "output=y", "bundles.segmenter=z"],
                             "segment_batch")):
        with pytest.raises(ValueError, match="is a string, not a boolean: write"):
            load_config(overrides, config_name=name)
    # any other word or a number acted as true or false without a word either
    for override, name in (("trainer.use_gpu=maybe", "trainer.use_gpu"),
                           ("trainer.cache_data=2", "trainer.cache_data"),
                           ("data.strict=1", "data.strict"),
                           ("model.deep_supervision=maybe", "model.deep_supervision")):
        with pytest.raises(ValueError, match=f"^{name} must be true or false, got "):
            load_config(["model=improved_unet", override])
    cfg = load_config(["run_name=on", "data.shuffle=false"])
    assert cfg["run_name"] == "on" and cfg["data"]["shuffle"] is False
    job = load_config(["input=no", "output=off", "bundles.segmenter=z",
                       '+ray_runtime_env={env_vars:{TOKENIZERS_PARALLELISM:"false"}}'],
                      config_name="segment_batch")
    assert job["ray_runtime_env"]["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"
    assert job["input"].endswith("/no")


@pytest.mark.parametrize("config_name, overrides, setting", [
    ("config", ["data=busi", "data.url=https://alice:s3cr3t@archive.example/busi"], "data.url"),
    ("config", ["output_dir=s3://AKIAX:s3cr3t@bucket/out"], "output_dir"),
    ("segment_batch", ["input=s3://bucket/in", "output=out", "bundles.segmenter=seg",
                       "storage.endpoint_url=http://admin:s3cr3t@127.0.0.1:8333"],
     "storage.endpoint_url"),
    ("evaluate", ["evaluate.segmenter=https://s3cr3t@models.example/seg"], "evaluate.segmenter"),
    ("pack", ["pack.out=s3://alice:s3cr3t@bucket/packs"], "pack.out"),
])
def test_a_url_carrying_credentials_is_refused_without_repeating_them(config_name, overrides,
                                                                       setting):
    """Credentials come only from the environment: a user:password@ in a URL setting would be
    printed in progress lines, error messages and reports. A `@` after the host is a name."""
    with pytest.raises(ValueError, match="the URL carries credentials") as caught:
        load_config(overrides, config_name=config_name)
    message = str(caught.value)
    assert "s3cr3t" not in message and "alice" not in message and "AKIAX" not in message
    assert setting in message and "***@" in message
    cfg = load_config(["data=busi", "data.url=s3://bucket/cases/a@b/x", "output_dir=/tmp/x@y"])
    assert cfg["data"]["url"] == "s3://bucket/cases/a@b/x"


def test_ray_data_progress_auto_is_bars_on_a_terminal_and_log_lines_elsewhere(monkeypatch):
    """Decided in the entry point's process: Ray Train's workers, where datasets also run,
    write to log files whatever the user's terminal is."""
    import sys

    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    assert load_config([])["data"]["read"]["progress"] == "log"
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert load_config([])["data"]["read"]["progress"] == "bars"
    assert load_config(["data.read.progress=off"])["data"]["read"]["progress"] == "off"
    with pytest.raises(ValueError, match="data.read.progress must be auto or one of"):
        load_config(["data.read.progress=quiet"])


def test_missing_object_storage_credentials_are_explained(tmp_path):
    """botocore says "Unable to locate credentials"; the entry points say where medseg takes
    them from (the environment only) and what a public bucket needs."""
    import subprocess
    import sys
    from pathlib import Path

    from botocore.exceptions import NoCredentialsError

    from pipelines.config import explained_storage_errors

    class RemoteNoCredentials(RuntimeError, NoCredentialsError):  # as Ray re-raises a task's
        pass

    from ray.train import WorkerGroupError

    # a Ray Train worker's failure (rank 0 writing to s3:// from a node without a role)
    in_worker = WorkerGroupError("[Rank 0 Error Snippet]: ...", {0: NoCredentialsError()})
    for raised in (NoCredentialsError(), RemoteNoCredentials(), in_worker):
        with pytest.raises(PermissionError, match="only from the environment") as caught:
            with explained_storage_errors():
                raise raised
        assert caught.value.__cause__ is raised
    with pytest.raises(KeyError), explained_storage_errors():  # others pass unchanged
        raise KeyError("x")

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(PYTHONPATH=str(root), AWS_EC2_METADATA_DISABLED="true",
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               AWS_CONFIG_FILE=str(tmp_path / "none"))
    proc = subprocess.run(
        [sys.executable, str(root / "pipelines" / "train.py"), f"output_dir={tmp_path}",
         "trainer=local", "data=busi", "data.url=s3://medseg-nowhere/busi",
         "data.endpoint_url=http://127.0.0.1:9"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "PermissionError: object storage asked for credentials and none were found" in \
        proc.stderr, proc.stderr[-2000:]
    assert "data.anonymous=true" in proc.stderr
    # with credentials, the same endpoint (nothing listens there) is said not to answer, in
    # one line: botocore's error came as a 100-line traceback
    env.update(AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s")
    proc = subprocess.run(proc.args, env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1
    assert "Error: ConnectionError: object storage did not answer (EndpointConnectionError: " \
           "Could not connect to the endpoint URL" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "data.endpoint_url" in proc.stderr


def test_object_storage_that_does_not_answer_or_refuses_is_explained():
    from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

    from pipelines.config import explained_storage_errors

    for raised in (EndpointConnectionError(endpoint_url="http://10.0.0.9:9000/b"),
                   ReadTimeoutError(endpoint_url="http://10.0.0.9:9000/b")):
        with pytest.raises(ConnectionError, match=r"object storage did not answer \(\w+Error: "
                           r".*http://10.0.0.9:9000/b.*check the endpoint \(data.endpoint_url"):
            with explained_storage_errors():
                raise OSError("listing failed") from raised
    denied = ClientError({"Error": {"Code": "SignatureDoesNotMatch", "Message": "m"}}, "List")
    with pytest.raises(PermissionError, match=r"^The request signature .* \(object storage "
                       r"refused the request: check the credentials in the environment"):
        with explained_storage_errors():
            raise PermissionError("The request signature we calculated does not match") \
                from denied
    with pytest.raises(PermissionError, match=r"^\[Errno 13\] Permission denied: '/x'$"):
        with explained_storage_errors():  # a local file's: unchanged
            raise PermissionError(13, "Permission denied", "/x")


@pytest.mark.parametrize("entry, override", [("train.py", "trainer.num_workers=0"),
                                              ("segment_batch.py", "limit=-1")])
def test_a_refused_setting_is_reported_without_a_traceback(tmp_path, entry, override):
    """The message said what to change, behind 10-15 lines of Hydra's traceback print; with
    HYDRA_FULL_ERROR=1 the traceback is there as for Hydra's own errors."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    args = [sys.executable, str(root / "pipelines" / entry), override]
    args += ([f"input={tmp_path}", f"output={tmp_path / 'out'}", "bundles.segmenter=x"]
             if entry == "segment_batch.py" else [f"output_dir={tmp_path}"])
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert re.search(r"^Error: ValueError: .*must be a whole number", proc.stderr, re.M), \
        proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR=1" in proc.stderr
    full = subprocess.run(args, env={**env, "HYDRA_FULL_ERROR": "1"}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert full.returncode == 1 and "Traceback" in full.stderr


def test_a_refusal_leaves_ray_before_its_message_so_that_the_message_comes_last(monkeypatch,
                                                                                capsys):
    """Ray prints the worker log lines it held back as the process leaves it: a run refused on
    a cluster ended with 15 lines of a worker's traceback after the `Error:` line."""
    from pipelines import cluster
    from pipelines.config import reported_refusals

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setattr(cluster, "disconnect",
                        lambda: print("(held-back worker lines)", file=sys.stderr))
    with pytest.raises(SystemExit) as exited, reported_refusals():
        raise ValueError("trainer.num_workers must be a whole number >= 1, got 0")
    assert exited.value.code == 1
    assert capsys.readouterr().err.splitlines() == [
        "(held-back worker lines)",
        "Error: ValueError: trainer.num_workers must be a whole number >= 1, got 0",
        "(HYDRA_FULL_ERROR=1 shows the traceback)"]
