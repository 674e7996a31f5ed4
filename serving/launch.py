"""Deploy `serving/config.yaml` (or a dict shaped like it) from Python, through the same path as
`serve run serving/config.yaml`: the config is validated as Serve's `ServeDeploySchema` and
handed to the Serve controller, which imports `serving.app:build_app`, calls it with the
application's `args` and applies the per-deployment settings (autoscaling, resources,
user_config). Used by the tests and the load benchmark."""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from ray import serve
from ray.serve.schema import ServeDeploySchema

CONFIG_PATH = Path(__file__).with_name("config.yaml")


def load_config(path: str | Path = CONFIG_PATH) -> dict[str, Any]:
    with open(path) as f:
        return yaml.safe_load(f)


def merge(base: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge (patch wins; lists and scalars are replaced)."""
    out = copy.deepcopy(dict(base))
    for key, value in patch.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def patch_deployment(app: dict[str, Any], name: str, patch: Mapping[str, Any]) -> None:
    """Merge `patch` into the deployment entry `name` of an application config (in place)."""
    for entry in app.setdefault("deployments", []):
        if entry.get("name") == name:
            entry.update(merge(entry, patch))
            return
    app["deployments"].append({"name": name, **copy.deepcopy(dict(patch))})


def deploy(config: Mapping[str, Any] | ServeDeploySchema, *, timeout_s: float = 180.0) -> str:
    """Start Serve with the config's HTTP options (kept if Serve already runs), apply the config
    and wait until every application in it is RUNNING (RuntimeError on failure or timeout).
    Returns the base URL Serve's HTTP proxy listens on: the config's, or, where Serve was
    already running, the one it was started with."""
    from ray.serve.context import _get_global_client  # what `serve run config.yaml` uses

    schema = (config if isinstance(config, ServeDeploySchema)
              else ServeDeploySchema.model_validate(dict(config)))
    serve.start(http_options=schema.http_options.model_dump(),
                proxy_location=schema.proxy_location)
    client = _get_global_client()
    client.deploy_apps(schema)
    wait_running([app.name for app in schema.applications], timeout_s=timeout_s)
    http = client.http_config
    host = "127.0.0.1" if http.host in ("0.0.0.0", "::", "") else http.host
    return f"http://{host}:{http.port}"


def wait_running(names: list[str], *, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    last: dict[str, str] = {}
    while time.monotonic() < deadline:
        apps = serve.status().applications
        last = {n: (apps[n].status if n in apps else "MISSING") for n in names}
        failed = {n: apps[n].message for n in names if n in apps and apps[n].status == "DEPLOY_FAILED"}
        if failed:
            raise RuntimeError(f"Serve application(s) failed to deploy: {failed}")
        if all(s == "RUNNING" for s in last.values()):
            return
        time.sleep(0.25)
    raise RuntimeError(f"Serve application(s) not RUNNING after {timeout_s:g} s: {last}")
