"""Ray front ends over medseg_core: data (Ray Data), train (Ray Train), batch jobs."""

import os
import re
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

# absolute, so entry points find their Hydra configs also when `ray submit` copies the script
# alone to the head node (the package itself is installed there by cluster.yaml)
CONF_DIR = str(Path(__file__).resolve().parent / "conf")


def local_dir(url: str) -> str:
    """A local folder for what Hydra writes under `url` (its logs, a sweep's multirun.yaml):
    `url` itself when it is a path, else a folder under the temporary directory named after it
    (Hydra writes with the local filesystem: `s3://bucket/x` became ./s3:/bucket/x)."""
    url = str(url)
    scheme = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", url)
    if scheme is None:
        return os.path.expanduser(url)
    if scheme.group(1).lower() == "file":
        return url[len("file://"):]
    rest = re.sub(r"[^A-Za-z0-9._/-]", "_", url[scheme.end():]).strip("/")
    return os.path.join(tempfile.gettempdir(), "medseg-hydra", scheme.group(1).lower(), rest)


# used by the configs' hydra.run.dir / hydra.sweep.dir, resolved before any entry point runs
OmegaConf.register_new_resolver("local_dir", local_dir, replace=True)
