"""cluster.yaml must pass Ray's own cluster-launcher schema, as `ray up` checks it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
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


def test_gpu_workers_have_an_instance_profile_for_the_run_storage():
    """Ray attaches its default instance profile to the head only
    (ray/autoscaler/_private/aws/config.py, `_configure_iam_role`): workers, where rank 0 writes
    checkpoints and read tasks read the archive, need one named in their node config."""
    for name, node_type in load()["available_node_types"].items():
        profile = node_type["node_config"].get("IamInstanceProfile")
        assert name == "head" or (profile and (profile.get("Name") or profile.get("Arn"))), name


def _kill_cluster(tmp: str) -> None:
    """Stop the processes of the cluster whose temp dir is `tmp` (`ray stop` would stop every
    Ray process on the machine, this session's shared test cluster included)."""
    import signal
    import time

    def pids() -> list[int]:
        found = []
        for d in Path("/proc").iterdir():
            try:
                if d.name.isdigit() and tmp.encode() in (d / "cmdline").read_bytes():
                    found.append(int(d.name))
            except OSError:
                pass
        return found

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids():
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.time() + 10
        while pids() and time.time() < deadline:
            time.sleep(0.2)


def _probe_on_its_own_cluster(probe: str, prefix: str, **env_vars: str) -> str:
    """Run `probe` (Python source) in a fresh interpreter that starts its own local Ray
    instance (no RAY_ADDRESS, its own RAY_TMPDIR: no other cluster to choose from); its stdout."""
    tmp = tempfile.mkdtemp(prefix=prefix, dir="/tmp")  # short: Ray's socket paths live in it
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=tmp, **env_vars)
    try:
        out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout
    finally:
        _kill_cluster(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def test_entry_points_join_a_cluster_started_with_ray_start(tmp_path_factory):
    """`ray submit cluster.yaml pipelines/train.py` runs the script on the head node, where
    `ray start --head` ran and RAY_ADDRESS is unset: the pipelines must join that cluster, not
    fail because they ask a new local one for CPUs."""
    tmp = tempfile.mkdtemp(prefix="msr", dir="/tmp")  # short: Ray's socket paths live in it
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = tmp
    ray_cli = str(Path(sys.executable).with_name("ray"))
    try:
        subprocess.run([ray_cli, "start", "--head", "--num-cpus=1", "--port=0",
                        "--include-dashboard=false", "--disable-usage-stats"],
                       env=env, check=True, capture_output=True, timeout=180)
        address = (Path(tmp) / "ray" / "ray_current_cluster").read_text().strip()

        def joined(probe: str) -> str:
            out = subprocess.run([sys.executable, "-c", probe + "import ray\nprint('JOINED', "
                                  "ray.get_runtime_context().gcs_address, SHOW)\n"], cwd=ROOT,
                                 env=env, capture_output=True, text=True, timeout=180)
            assert out.returncode == 0, out.stderr[-2000:]
            return out.stdout

        # the recorded cluster (1 CPU), not a new local one sized for the trainer (3 CPUs)
        assert f"JOINED {address} 1.0" in joined(
            "from pipelines.train_ray import init_ray\n"
            "init_ray({'num_workers': 2, 'cpus_per_worker': 1})\n"
            "SHOW = __import__('ray').cluster_resources()['CPU']\n")
        # the bulk job's default (no address, no CPU count), where `ray.init()` joins without
        # complaint: a cluster it joined, whose autoscaler may add GPU nodes, so a GPU pool
        # waits for them instead of being refused as by a local cluster this run started
        assert f"JOINED {address} False" in joined(
            "from pipelines import cluster\n"
            "cluster.connect(None, None)\n"
            "cluster.check_fits({'CPU': 1.0, 'GPU': 0.25}, 'one actor of the pool')\n"
            "SHOW = cluster._started_here\n")
    finally:
        _kill_cluster(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def test_disconnect_prints_the_log_lines_ray_held_back_before_what_follows():
    """Ray holds back a worker's line repeated by other workers, to print it once with a count
    ("[repeated 5x across cluster]"), until another line comes or the driver leaves Ray: at
    the end of a run it came after the run's closing lines. Leaving Ray with `disconnect` first
    puts them before."""
    probe = ("import time\n"
             "import ray\n"
             "from pipelines.cluster import connect, disconnect\n"
             "connect(num_cpus=2, dashboard=False)\n"
             "@ray.remote\n"
             "def say():\n"
             "    print('the same line from every task')\n"
             "    time.sleep(0.3)\n"
             "ray.get([say.remote() for _ in range(6)])\n"
             "time.sleep(1)\n"
             "disconnect()\n"
             "print('CLOSING LINE', flush=True)\n")
    # Ray's default deduplication (this test session turns it off)
    stdout = _probe_on_its_own_cluster(probe, "msl", RAY_DEDUP_LOGS="1")
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines[-1] == "CLOSING LINE", lines[-3:]
    assert any("repeated" in line and "the same line" in line for line in lines[:-1]), lines


def test_task_slots_count_what_both_cpus_and_gpus_allow():
    from pipelines.cluster import task_slots

    assert task_slots(3, 0.25, resources={"CPU": 4.0, "GPU": 1.0}) == 1  # 3 CPUs each
    assert task_slots(3, 0.25, resources={"CPU": 16.0, "GPU": 1.0}) == 4
    assert task_slots(1, 0.25, resources={"CPU": 16.0, "GPU": 2.0}) == 8
    assert task_slots(1, 0, resources={"CPU": 2.0}) == 2
    assert task_slots(1, 0, resources={"CPU": 8.0}, exclude_cpus=6) == 2
    assert task_slots(4, 0, resources={"CPU": 2.0}) == 1  # at least one


def test_a_local_cluster_an_entry_point_starts_serves_rays_state_api(ray_cluster):
    """Ray Train's placement-group cleaner asks the state API (served by the dashboard) from a
    worker whether its controller lives; on a cluster started without the dashboard it could
    not, and warned every few seconds for the whole run. With another Ray instance on the
    machine (here the test session's) it died with "Found multiple active Ray instances"."""
    probe = ("from pipelines.train_ray import init_ray\n"
             "init_ray({'num_workers': 1, 'cpus_per_worker': 1, 'local_num_cpus': 1})\n"
             "import ray\n"
             "A = ray.remote(num_cpus=0)(type('A', (), {}))\n"
             "a = A.remote()\n"
             "ray.get(a.__ray_ready__.remote())\n"
             "@ray.remote(num_cpus=0)\n"
             "def state(actor_id):\n"
             "    from ray.util.state import get_actor\n"
             "    return get_actor(actor_id).state\n"
             "print('STATE', ray.get(state.remote(a._actor_id.hex())))\n")
    assert "STATE ALIVE" in _probe_on_its_own_cluster(probe, "msd")


def test_ray_address_local_starts_the_cluster_the_entry_point_asks_for():
    """RAY_ADDRESS=local is Ray's word for "start a new local instance": the entry point starts
    it as with no address (its CPU count and dashboard setting, this tree on the workers' path,
    refusals of what it can never grant) instead of a bare one, where each epoch's read tasks
    of a Ray Train run waited ~3 s for a worker process."""
    probe = ("import ray\n"
             "from pipelines import cluster\n"
             "cluster.connect(num_cpus=3, dashboard=False)\n"
             "print('CPUS', ray.cluster_resources()['CPU'], 'STARTED', cluster._started_here)\n"
             "try:\n"
             "    cluster.check_fits({'CPU': 4}, 'this run')\n"
             "except RuntimeError as e:\n"
             "    print('REFUSED', e)\n")
    out = _probe_on_its_own_cluster(probe, "msw", RAY_ADDRESS="local")
    assert "CPUS 3.0 STARTED True" in out, out
    assert "REFUSED this run needs 4 CPU" in out, out


def test_a_runtime_env_holding_a_secret_is_refused_and_ordinary_variables_pass():
    """Ray writes a runtime_env, values included, to runtime_env_agent.log."""
    from pipelines.cluster import check_runtime_env

    for name, value in (("AWS_SECRET_ACCESS_KEY", "s"), ("AWS_SESSION_TOKEN", "t"),
                        ("MY_API_KEYS", "abcd"), ("DB_PASS", "hunter2"), ("GITHUB_PAT", "ghp")):
        with pytest.raises(ValueError, match=f"env_vars.{name}: a secret must not be"):
            check_runtime_env({"env_vars": {name: value}}, "ray_runtime_env")
    # words that only contain a secret word, flags, and variables that name a file
    check_runtime_env({"env_vars": {
        "PYTHONPATH": "/opt/medseg", "TOKENIZERS_PARALLELISM": "false",
        "MY_KEYBOARD_LAYOUT": "us", "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
        "AWS_SHARED_CREDENTIALS_FILE": "/root/.aws/credentials",
        "GOOGLE_APPLICATION_CREDENTIALS": "/secrets/key.json"}}, "ray_runtime_env")
    with pytest.raises(ValueError, match="must be a mapping"):
        check_runtime_env("PYTHONPATH=/x", "ray_runtime_env")


def test_a_request_that_cannot_fit_gets_the_advice_of_the_resource_it_lacks(monkeypatch):
    """A GPU run short of CPUs was told to switch its GPUs off."""
    import ray

    from pipelines import cluster

    monkeypatch.setattr(cluster, "_started_here", True)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0, "GPU": 1.0})
    hints = {"CPU": "fewer CPUs.", "GPU": "no GPUs."}
    with pytest.raises(RuntimeError, match=r"needs 8 CPU, 1 GPU.* has 2 CPU, 1 GPU: it would "
                                           r"wait for ever\. fewer CPUs\.$"):
        cluster.check_fits({"CPU": 8, "GPU": 1}, "the group", hints)
    with pytest.raises(RuntimeError, match=r"wait for ever\. no GPUs\. fewer CPUs\.$"):
        cluster.check_fits({"CPU": 8, "GPU": 2}, "the group", hints)
    cluster.check_fits({"CPU": 2, "GPU": 1}, "the group", hints)


def test_a_local_path_the_nodes_of_a_joined_cluster_do_not_see_is_refused(
        ray_cluster, tmp_path, monkeypatch, capsys):
    """On a cluster joined (not started here), an output folder or archive on the driver's disk
    that the nodes running the work cannot see is refused before any work: rank 0 wrote its
    checkpoints on a GPU node, and read tasks counted the archive's files as bad input.
    `/proc/self/cwd/...` stands in for a path only the driver has: in the probe task it is
    the Ray worker's own working directory."""
    from pipelines import cluster

    monkeypatch.setattr(cluster, "_started_here", False)
    (tmp_path / "archive").mkdir()
    monkeypatch.chdir(tmp_path)
    shared = tmp_path / "shared-out"
    cluster.check_shared_paths({"output_dir": str(shared)},
                               {"data.url": f"file://{tmp_path / 'archive'}"},
                               {"CPU": 1}, 2, "the workers")
    assert "checking that the nodes running the workers see data.url, output_dir" in (
        capsys.readouterr().out)
    assert shared.is_dir() and not list(shared.iterdir())  # the marker is removed
    with pytest.raises(RuntimeError, match=r"^output_dir=/proc/self/cwd/out: a path on this "
                                           r"machine .* that the node .* running the workers "
                                           r"does not see\. .*s3://"):
        cluster.check_shared_paths({"output_dir": "/proc/self/cwd/out"}, {}, {"CPU": 1}, 1,
                                   "the workers")
    assert (tmp_path / "out").is_dir() and not list((tmp_path / "out").iterdir())
    with pytest.raises(RuntimeError, match=r"^data.url=/proc/self/cwd/archive: "):
        cluster.check_shared_paths({"output_dir": str(shared)},
                                   {"data.url": "/proc/self/cwd/archive"}, {"CPU": 1}, 1,
                                   "the workers")
    # a local instance started here shares this machine: nothing is asked
    monkeypatch.setattr(cluster, "_started_here", True)
    cluster.check_shared_paths({"output_dir": "/proc/self/cwd/out"}, {}, {"CPU": 1}, 1, "x")
    # object storage and paths missing here are not this check's to judge
    monkeypatch.setattr(cluster, "_started_here", False)
    cluster.check_shared_paths({"output_dir": "s3://bucket/out"},
                               {"data.url": str(tmp_path / "absent")}, {"CPU": 1}, 1, "x")
