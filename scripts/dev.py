#!/usr/bin/env python3
"""Set up a virtualenv for medseg and run one of its jobs; needs nothing but Python 3.10+.

    python3 scripts/dev.py demo [hydra overrides]   # the main job on the embedded synthetic data
    python3 scripts/dev.py test [pytest args]       # the test suite (what CI runs)
    python3 scripts/dev.py bench NAME [args]        # a benchmark under benchmarks/
    python3 scripts/dev.py setup                    # only create/refresh .venv

Which torch build: with no NVIDIA GPU (no working `nvidia-smi`), torch is pinned by
constraints/cpu.txt, which picks the CPU wheel where one is offered (the local wheel cache on
our build machines, or https://download.pytorch.org/whl/cpu when PIP_EXTRA_INDEX_URL names it);
with a GPU, torch comes unpinned from PyPI, whose Linux wheels are the CUDA builds. Set
MEDSEG_TORCH=cpu or MEDSEG_TORCH=cuda to override the detection.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("MEDSEG_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"


def has_gpu() -> bool:
    choice = os.environ.get("MEDSEG_TORCH", "auto").lower()
    if choice in ("cpu", "cuda"):
        return choice == "cuda"
    smi = shutil.which("nvidia-smi")
    if not smi:
        return False
    return subprocess.run([smi, "-L"], capture_output=True).returncode == 0


def run(cmd: list[str], **kw) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT, **kw)


def setup(dev: bool) -> None:
    """Create .venv and install the project (editable) unless it is already up to date."""
    gpu = has_gpu()
    extra = "[dev]" if dev else ""
    key = hashlib.sha256(
        (ROOT / "pyproject.toml").read_bytes()
        + (ROOT / "constraints" / "cpu.txt").read_bytes()
        + f"{extra}{gpu}{sys.version}".encode()
    ).hexdigest()
    stamp = VENV / ".medseg-installed"
    if stamp.exists() and stamp.read_text() == key:
        return
    if not PY.exists():
        run([sys.executable, "-m", "venv", VENV])
    pip = [PY, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    # torch first, so that the project's `torch>=...` range is already satisfied afterwards.
    run(pip + (["torch"] if gpu else ["-c", "constraints/cpu.txt", "torch"]))
    cons = [] if gpu else ["-c", "constraints/cpu.txt"]
    run(pip + cons + ["-e", f".{extra}"])
    stamp.write_text(key)


def ensure_chromium() -> None:
    """Browser tests need Debian's chromium; install it when we can (root + apt-get)."""
    if shutil.which("chromium") or shutil.which("chromium-browser"):
        return
    if shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        try:
            run(["apt-get", "update", "-qq"], env=env)
            run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"], env=env)
        except subprocess.CalledProcessError:
            print("chromium could not be installed; browser tests will be skipped", flush=True)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    cmd, rest = argv[0], argv[1:]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if cmd == "setup":
        setup(dev=True)
        return 0
    if cmd == "demo":
        setup(dev=False)
        return subprocess.run([PY, "pipelines/train.py", *rest], cwd=ROOT, env=env).returncode
    if cmd == "test":
        setup(dev=True)
        ensure_chromium()
        return subprocess.run([PY, "-m", "pytest", *rest], cwd=ROOT, env=env).returncode
    if cmd == "bench":
        setup(dev=True)
        if not rest:
            print("benchmarks:", ", ".join(p.stem for p in sorted((ROOT / "benchmarks").glob("*.py"))))
            return 2
        script = ROOT / "benchmarks" / f"{rest[0]}.py"
        return subprocess.run([PY, script, *rest[1:]], cwd=ROOT, env=env).returncode
    print(f"unknown command {cmd!r}\n{__doc__}")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
