"""DDP scaling of the Ray Train loop: training samples/s with 1 and 2 CPU workers on the same
data, measured in one run.

    python3 scripts/dev.py bench train_scaling [hydra overrides]

Each worker gets one CPU (Ray sets OMP_NUM_THREADS=1 for it), so 2 workers use twice the
cores of 1. The data are decoded once into the object store (`trainer.cache_data`), so
decoding does not compete with the workers on a 2-core machine. samples/s is taken from the epochs after the first (warm-up), from the loop's own
step timing, so dataset start-up is excluded. Last line:
`RESULT ddp_scaling_2w=<samples/s with 2 workers / samples/s with 1 worker>`.
"""

from __future__ import annotations

import csv
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray

from pipelines.cluster import connect
from pipelines.config import load_config
from pipelines.train import run

BASE = [
    "trainer=ray", "stages=[segmenter]", "model=unet",
    "data.generate.n_per_class=40", "data.generate.size=128", "data.image_size=[128,128]",
    "train.batch_size=8", "train.epochs=4", "trainer.cpus_per_worker=1",
    # decoded once up front: on 2 cores the per-epoch decode tasks would compete with the
    # workers, and this measures the trainer's scaling
    "trainer.cache_data=true",
]


def samples_per_s(out: Path, run_name: str) -> float:
    with open(out / "runs" / run_name / "segmenter" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return statistics.median(float(r["samples_per_s"]) for r in rows[1:])


def main(overrides: list[str]) -> None:
    out = Path(tempfile.mkdtemp(prefix="medseg-scaling-"))
    # 2 trainer CPUs + 1 for Ray Data's decode tasks
    connect(num_cpus=3, dashboard=False)
    results = {}
    for workers in (1, 2):
        name = f"scale{workers}"
        cfg = load_config([f"output_dir={out}", f"run_name={name}", *BASE,
                           f"trainer.num_workers={workers}", *overrides])
        t0 = time.perf_counter()
        run(cfg)
        results[workers] = samples_per_s(out, name)
        print(f"{workers} worker(s): {results[workers]:8.1f} samples/s "
              f"(run {time.perf_counter() - t0:.0f} s)", flush=True)
    ray.shutdown()
    ratio = results[2] / results[1]
    print(f"\n| workers | samples/s |\n| --- | --- |\n| 1 | {results[1]:.1f} |\n"
          f"| 2 | {results[2]:.1f} |")
    print(f"RESULT ddp_scaling_2w={ratio:.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
