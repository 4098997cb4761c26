"""Training throughput of the Bayesian U-Net: mixed precision against fp32, same run.

Times optimiser steps (forward, DiceCE loss, backward, AdamW) of the pipeline's network on
random CT-like patches, with bf16 autocast and without, interleaved and after a warm-up, and
reports patches per second, peak GPU memory and the AMP speed-up as a ratio against the
fp32 baseline measured in the same process. The ``study`` shape is a clinical-size patch
(``--shape``), the ``demo`` one the demo's.

    python benchmarks/train_throughput.py --device cuda --shape 128,128,64 \\
        --channels 16,32,64,128 --batch 2 --steps 20
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fedct.model.unet import build_bayesian_unet
from fedct.training.loop import make_loss


def timed_steps(model, opt, loss_fn, x, y, steps: int, amp: bool, device) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(model(x).float(), y)
        loss.backward()
        opt.step()
    sync()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", default="128,128,64")
    p.add_argument("--channels", default="16,32,64,128")
    p.add_argument("--classes", type=int, default=11)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    device = torch.device(args.device)
    shape = tuple(int(v) for v in args.shape.split(","))
    channels = tuple(int(v) for v in args.channels.split(","))
    torch.manual_seed(0)
    model = build_bayesian_unet(args.classes, channels, (2,) * (len(channels) - 1), 0.5).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = make_loss()
    x = torch.randn(args.batch, 1, *shape, device=device)
    y = torch.randint(0, args.classes, (args.batch, 1, *shape), device=device)
    modes = [False, True] if device.type == "cuda" else [False]
    times: dict[bool, list[float]] = {m: [] for m in modes}
    for m in modes:  # warm-up (cuDNN autotune, allocator)
        timed_steps(model, opt, loss_fn, x, y, 3, m, device)
    for _ in range(args.repeats):
        for m in modes:
            times[m].append(timed_steps(model, opt, loss_fn, x, y, args.steps, m, device))
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device {name}; patch {shape}, batch {args.batch}, channels {channels}; "
          f"torch {torch.__version__}")
    base = statistics.median(times[False])
    for m in modes:
        med = statistics.median(times[m])
        print(f"  {'bf16 autocast' if m else 'fp32':14s} {med * 1000:8.1f} ms/step  "
              f"{args.batch / med:7.1f} patches/s  speed-up x{base / med:.2f} vs fp32")
    if device.type == "cuda":
        print(f"  peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
