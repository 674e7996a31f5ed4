"""Connecting an entry point to Ray: the one way every pipeline does it."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]


_started_here = False  # this process started the local Ray instance it is connected to


def connect(address: str | None = None, num_cpus: float | None = None,
            runtime_env: dict[str, Any] | None = None, dashboard: bool | None = None) -> None:
    """Join the running cluster (`address`, RAY_ADDRESS, `ray job submit`, or the one `ray start`
    started on this machine, as under `ray submit`), or start a local one (no address, or
    `local`) with `num_cpus` logical CPUs and this source tree on the workers' path.

    A local cluster gets Ray's dashboard (`dashboard=None`, Ray's default) unless `dashboard` is
    False (the test session, benchmarks): Ray's state API runs in it, and without it Ray Train's
    placement-group cleaner cannot watch its controller and warns every few seconds."""
    import ray

    global _started_here
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":  # "local": Ray's word for a new local instance
        ray.init(address=address, runtime_env=runtime_env)
        return
    if runtime_env is None and (_ROOT / "medseg_core").is_dir():
        runtime_env = {"env_vars": {"PYTHONPATH": str(_ROOT)},
                       "worker_process_setup_hook": "pipelines.cluster.pin_ray_address"}
    if address is None and _recorded_cluster() is not None:
        # With no address Ray joins the cluster that `ray start` recorded on this machine (the
        # head node under `ray submit`), whose autoscaler may add the nodes a request needs
        ray.init(runtime_env=runtime_env)
        return
    try:
        ray.init(address=address, num_cpus=int(num_cpus) if num_cpus else None,
                 include_dashboard=dashboard, runtime_env=runtime_env)
        _started_here = True
    except ValueError as e:
        # a cluster `ray start` recorded since the check above: Ray refuses resource arguments
        # for it, join it as it is
        if "existing cluster" not in str(e):
            raise
        ray.init(runtime_env=runtime_env)


def pin_ray_address() -> None:
    """Worker setup hook of the clusters `connect` starts or finds: RAY_ADDRESS set to the
    worker's own cluster. Ray's state API, which Ray Train's placement-group cleaner polls from
    a worker, otherwise looks for the cluster among the processes of the machine and fails
    with "Found multiple active Ray instances" wherever a second one runs (two runs at once,
    a test session beside a run)."""
    import ray

    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)


# words of environment variable names that hold secrets: Ray writes a runtime_env, values
# included, to its logs (runtime_env_agent.log)
_SECRET_WORDS = frozenset({"SECRET", "SECRETS", "TOKEN", "TOKENS", "PASSWORD", "PASSWD", "PASS",
                           "PAT", "KEY", "KEYS", "APIKEY", "CREDENTIAL", "CREDENTIALS"})
_FLAG_VALUES = frozenset({"", "0", "1", "true", "false", "yes", "no", "on", "off"})


def _looks_secret(name: str, value: Any) -> bool:
    """A variable named with a secret word (TOKEN, not TOKENIZERS) whose value is neither a
    flag nor a file path (GOOGLE_APPLICATION_CREDENTIALS=/path/key.json names a file)."""
    if not set(str(name).upper().split("_")) & _SECRET_WORDS:
        return False
    text = str(value).strip()
    return text.lower() not in _FLAG_VALUES and not text.startswith(("/", "~", "./", "../"))


def check_runtime_env(runtime_env: Any, setting: str) -> None:
    """Refuse a runtime_env that is no mapping, or whose `env_vars` hold a secret."""
    if runtime_env is None:
        return
    if not isinstance(runtime_env, dict):
        raise ValueError(f"{setting} must be a mapping (Ray's runtime_env), got {runtime_env!r}")
    for name, value in dict(runtime_env.get("env_vars") or {}).items():
        if _looks_secret(name, value):
            raise ValueError(
                f"{setting}.env_vars.{name}: a secret must not be in a runtime_env, which Ray "
                "writes to its logs; set it in the environment of the processes that need it "
                "(for S3, the job's driver: storage.forward_credentials hands its AWS_* "
                "variables to the actors in memory)")


def _recorded_cluster() -> str | None:
    """The address `ray.init()` without one joins: the cluster `ray start` recorded on this
    machine, if one is running (Ray's own lookup)."""
    from ray._private.services import canonicalize_bootstrap_address

    try:
        return canonicalize_bootstrap_address(None)
    except ConnectionError:
        return None


def disconnect() -> None:
    """Leave Ray at the end of an entry point: a local instance this process started stops, a
    cluster it joined goes on. Ray prints the worker log lines it still holds back (to count
    repeats) as it disconnects, so what the entry point prints afterwards comes last. A run
    that never imported Ray (`trainer=local`, `pack.backend=local`) does not import it here."""
    global _started_here
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    _started_here = False


def check_fits(need: dict[str, float], what: str, hint: str | Mapping[str, str] = "") -> None:
    """Refuse at once a request (`need`: resources of what must run together) that the local
    Ray instance this process started can never grant: nothing adds nodes to it, so Ray would
    wait for ever ("No available node types can fulfill resource request"). On a cluster it
    joined, an autoscaler may still bring the nodes, and the request waits as usual. `hint`:
    advice, or advice per resource (that of each resource short is given)."""
    import ray

    if not (_started_here and ray.is_initialized()):
        return
    have = ray.cluster_resources()
    short = {k: v for k, v in need.items() if v > 0 and v > have.get(k, 0.0) + 1e-9}
    if short:
        ask = ", ".join(f"{v:g} {k}" for k, v in need.items() if v > 0)
        got = ", ".join(f"{have.get(k, 0.0):g} {k}" for k in need if need[k] > 0)
        why = (" (Ray sees no GPU on this machine)" if "GPU" in short and not have.get("GPU")
               else "")
        if not isinstance(hint, str):
            hint = " ".join(hint[k] for k in sorted(short, reverse=True) if k in hint)
        raise RuntimeError(f"{what} needs {ask}, and the local Ray cluster this run started has "
                           f"{got}{why}: it would wait for ever. {hint}".rstrip())


def cluster_resources() -> dict[str, float]:
    """The running cluster's total resources; this machine's cores before Ray starts."""
    import ray

    return ray.cluster_resources() if ray.is_initialized() else {"CPU": os.cpu_count() or 1}


def task_slots(num_cpus: float = 1, num_gpus: float = 0, *,
               resources: dict[str, float] | None = None, exclude_cpus: float = 0) -> int:
    """How many tasks or actors asking for `num_cpus` and `num_gpus` each fit in `resources`
    (default: `cluster_resources()`) at once, leaving `exclude_cpus` aside: the fewer of what
    the CPUs and the GPUs allow (four 0.25-GPU actors of 3 CPUs do not fit one GPU and 4 CPUs)."""
    resources = cluster_resources() if resources is None else resources
    cpus = resources.get("CPU", 1) - (exclude_cpus or 0)
    fits = int(cpus // max(num_cpus or 1, 1e-3))
    if num_gpus and num_gpus > 0:
        fits = min(fits, int(resources.get("GPU", 1) // num_gpus))
    return max(1, fits)


def local_path(url: str) -> str | None:
    """The absolute path of a local `url` (a path or file://), None for any other filesystem."""
    import fsspec

    from medseg_core.io import is_local

    fs, path = fsspec.core.url_to_fs(str(url))
    return path if is_local(fs) else None


def check_shared_paths(written: Mapping[str, str], read: Mapping[str, str],
                       resources: Mapping[str, float], count: int, what: str) -> None:
    """On a cluster this process joined, refuse local paths that the nodes running `what`
    (`count` tasks or workers of `resources` each) do not see: a setting in `written` (a folder
    they write to, e.g. output_dir) or in `read` (a file or folder they read; checked where it
    exists here). Each would otherwise write its results on its own machine, which the
    autoscaler later terminates, or count the files it cannot find as bad input. A probe task
    of the same shape looks for a marker written here; on a local instance started here every
    task shares this machine, and nothing is asked."""
    import ray

    if _started_here or not ray.is_initialized():
        return
    markers: dict[str, str] = {}
    for setting, url in written.items():
        path = local_path(url)
        if path is not None:
            os.makedirs(path, exist_ok=True)
            marker = os.path.join(path, f".medseg-shared-{uuid.uuid4().hex}")
            with open(marker, "w"):
                pass
            markers[setting] = marker
    for setting, url in read.items():
        path = local_path(url)
        if path is not None and os.path.exists(path):
            markers[setting] = path
    if not markers:
        return

    def probe(paths: dict[str, str]) -> tuple[str, list[str]]:
        import os as _os

        import ray as _ray

        return (_ray.util.get_node_ip_address(),
                [setting for setting, p in paths.items() if not _os.path.exists(p)])

    shape = {k: float(v) for k, v in resources.items() if float(v) > 0}
    task = ray.remote(probe).options(
        num_cpus=shape.pop("CPU", 0.0), num_gpus=shape.pop("GPU", 0.0), resources=shape or None,
        scheduling_strategy="SPREAD", max_retries=0)
    try:
        print(f"checking that the nodes running {what} see {', '.join(sorted(markers))} "
              "(on an autoscaling cluster this waits for them to start)", flush=True)
        seen = ray.get([task.remote(markers) for _ in range(max(1, int(count)))])
    finally:
        for setting in written:
            if setting in markers:
                try:
                    os.remove(markers[setting])
                except OSError:
                    pass
    here = ray.util.get_node_ip_address()
    blind = {node: missing for node, missing in seen if missing}
    if blind:
        node, missing = next(iter(blind.items()))
        names = ", ".join(f"{s}={written.get(s, read.get(s))}" for s in missing)
        raise RuntimeError(
            f"{names}: a path on this machine ({here}) that the node {node} running {what} "
            "does not see. On a cluster of several machines put it on object storage "
            "(s3://...) or on a file system every node mounts (NFS, EFS) at the same path; a "
            "local path works only where everything runs on this machine")
