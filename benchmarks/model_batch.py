"""Forward-pass cost per image by batch size and memory layout, on this machine's CPU or GPU.

    python3 scripts/dev.py bench model_batch [--threads 1] [--device cpu] [--seconds 3] [--bf16]

Builds the default U-Net (`pipelines/conf/model/unet.yaml`) and lesion classifier
(`pipelines/conf/classifier/cnn.yaml`) with seeded random weights, and for each layout (NCHW,
channels_last) and batch size runs forward passes at 256x256 for `--seconds`, after one
warm-up pass. It prints ms per image; the bulk job's `batch.model_batch_size` and Serve's
`max_batch_size` pay off only where a larger batch costs less per image. Last line:

    RESULT unet_batch8_vs_batch1=<ms per image at batch 8 / at batch 1, channels_last>
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

from medseg_core.models import build_model  # noqa: E402
from pipelines.train import classifier_model  # noqa: E402

MODELS = {"unet": "model/unet.yaml", "classifier": "classifier/cnn.yaml"}


def ms_per_image(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], seconds: float,
                 device: str, bf16: bool = False) -> float:
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                              enabled=bf16)
    with torch.inference_mode(), autocast:
        model(*inputs)
        if device == "cuda":
            torch.cuda.synchronize()
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            model(*inputs)
            n += inputs[0].shape[0]
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / n * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seconds", type=float, default=3.0, help="timed seconds per setting")
    p.add_argument("--batches", default="1,2,4,8")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--bf16", action="store_true",
                   help="also time bf16 autocast (inference `amp`), rows interleaved with float32")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    print(f"device {args.device}, {torch.get_num_threads()} torch thread(s), "
          f"{args.size}x{args.size}")
    print("| model | layout | precision | " + " | ".join(f"batch {b}" for b in batches) + " |")
    print("| --- | --- | --- |" + " ---: |" * len(batches))
    results: dict[tuple[str, bool, int, bool], float] = {}
    precisions = (False, True) if args.bf16 else (False,)
    for name, path in MODELS.items():
        torch.manual_seed(0)
        model_cfg = yaml.safe_load((ROOT / "pipelines" / "conf" / path).read_text())
        if name == "classifier":  # BUSI's three classes
            model_cfg = classifier_model(model_cfg, ("normal", "benign", "malignant"))
        model = build_model(model_cfg)
        model = model.eval().to(args.device)
        for channels_last in (False, True):
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            model = model.to(memory_format=fmt)
            for bf16 in precisions:
                row = []
                for b in batches:
                    image = torch.rand(b, 3, args.size, args.size, device=args.device)
                    inputs: tuple[torch.Tensor, ...] = (image.contiguous(memory_format=fmt),)
                    if name == "classifier":
                        mask = (torch.rand(b, 1, args.size, args.size, device=args.device) > 0.5)
                        inputs += (mask.float().contiguous(memory_format=fmt),)
                    ms = ms_per_image(model, inputs, args.seconds, args.device, bf16)
                    results[(name, channels_last, b, bf16)] = ms
                    row.append(f"{ms:.1f}")
                layout = "channels_last" if channels_last else "NCHW"
                precision = "bf16" if bf16 else "float32"
                print(f"| {name} | {layout} | {precision} | " + " | ".join(row) + " |", flush=True)
    if args.bf16:
        gains = {name: results[(name, True, batches[0], False)]
                 / results[(name, True, batches[0], True)] for name in MODELS}
        print(f"bf16 speed-up, channels_last, batch {batches[0]}: "
              + ", ".join(f"{name} {gain:.2f}x" for name, gain in gains.items()))
    ratio = results[("unet", True, batches[-1], False)] / results[("unet", True, batches[0], False)]
    print(f"RESULT unet_batch{batches[-1]}_vs_batch{batches[0]}={ratio:.2f}")


if __name__ == "__main__":
    main()
