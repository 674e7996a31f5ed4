"""Training throughput of one Ray Train worker (not a test): segmenter samples/s of the loop
(`pipelines/loop.py`) with the data decoded once into Ray's object store
(`trainer.cache_data`), so that decoding is not what is measured. Each epoch's
`data_wait_fraction` (and on CUDA `gpu_busy_fraction`) tells whether the data side still held
the device back.

    python3 scripts/dev.py bench train_throughput            # CPU, 128 px (a smoke run)
    python3 scripts/dev.py bench train_throughput --gpu      # one GPU: 256 px, bf16, GPU augmentation

The model is the classic U-Net (`model=unet`); the data the synthetic set at the chosen size.
samples/s is the median over the epochs after the first (warm-up), from the loop's own step
timing. Hydra overrides after the options are passed on. Last line:
`RESULT train_images_per_s=<samples/s> data_wait=<fraction> gpu_busy=<fraction or nan>`.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray

from pipelines.cluster import connect
from pipelines.config import load_config
from pipelines.train import run

COMMON = ["trainer=ray", "stages=[segmenter]", "model=unet", "trainer.num_workers=1",
          "trainer.cache_data=true", "train.eval_batch_size=64"]
PRESETS = {
    "cpu": ["data.generate.n_per_class=40", "data.generate.size=128",
            "data.image_size=[128,128]", "train.batch_size=8", "train.epochs=3",
            "trainer.cpus_per_worker=1"],
    "gpu": ["data.generate.n_per_class=400", "data.generate.size=256",
            "data.image_size=[256,256]", "train.batch_size=64", "train.epochs=6",
            "trainer.use_gpu=true", "trainer.gpu_augment=true", "trainer.channels_last=true",
            "trainer.cpus_per_worker=4"],
}


def epoch_rows(out: Path, run_name: str) -> list[dict[str, str]]:
    with open(out / "runs" / run_name / "segmenter" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def median_of(rows: list[dict[str, str]], key: str) -> float:
    values = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
    return statistics.median(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="one GPU worker (the gpu preset)")
    args, overrides = parser.parse_known_args()
    preset = "gpu" if args.gpu else "cpu"
    out = Path(tempfile.mkdtemp(prefix="medseg-throughput-"))
    connect(dashboard=False)
    cfg = load_config([f"output_dir={out}", "run_name=throughput", *COMMON, *PRESETS[preset],
                       *overrides])
    run(cfg)
    ray.shutdown()
    rows = epoch_rows(out, "throughput")
    print("\n| epoch | samples/s | data wait | GPU busy |\n| ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {int(float(r['epoch']))} | {float(r['samples_per_s']):.1f} | "
              f"{float(r['data_wait_fraction']):.3f} | {r.get('gpu_busy_fraction') or '-'} |")
    steady = rows[1:] or rows
    size = cfg["data"]["image_size"]
    print(f"\n{preset} preset, {size[0]}x{size[1]}, batch {cfg['train']['batch_size']}, "
          f"{len(steady)} epochs after the first")
    print(f"RESULT train_images_per_s={median_of(steady, 'samples_per_s'):.1f} "
          f"data_wait={median_of(steady, 'data_wait_fraction'):.3f} "
          f"gpu_busy={median_of(steady, 'gpu_busy_fraction'):.3f}")


if __name__ == "__main__":
    main()
