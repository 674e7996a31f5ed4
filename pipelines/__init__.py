"""Ray front ends over medseg_core: data (Ray Data), train (Ray Train), batch jobs."""

from pathlib import Path

# absolute, so entry points find their Hydra configs also when `ray submit` copies the script
# alone to the head node (the package itself is installed there by cluster.yaml)
CONF_DIR = str(Path(__file__).resolve().parent / "conf")
