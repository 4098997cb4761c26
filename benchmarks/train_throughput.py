"""Training and MC-sampling throughput of the Bayesian U-Net: memory layout and precision,
each against its baseline measured in the same process.

Times optimiser steps (forward, DiceCE loss, backward, AdamW) of the pipeline's network on
random CT-like patches and batched MC-dropout forwards (``--mc`` samples of a whole
volume), for every variant:

- layout: channels-last weights (what ``build_bayesian_unet`` builds) against the default
  contiguous ("NCDHW") layout of the same weights;
- precision: bf16 autocast against fp32, where the device computes bf16 natively (CUDA, or
  a CPU with AMX / AVX512-BF16: ``fedct.devices.use_amp``).

Variants are interleaved (repeat 1 of every variant, then repeat 2...) after a warm-up, so
that load drifting on a shared machine hits all alike; medians are reported, and each
variant's speed-up is the baseline's median time over its own. Defaults are the demo's
network and patch (``params.yaml``); ``--shape``/``--channels`` set a clinical size.

    python benchmarks/train_throughput.py --threads 1 --json results/benchmarks/train-step.json
    python benchmarks/train_throughput.py --device cuda --shape 128,128,64 \\
        --channels 16,32,64,128 --batch 2 --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from fedct import devices
from fedct.config import load_params
from fedct.model.unet import build_bayesian_unet
from fedct.training.loop import make_loss

LAYOUTS = {"channels_last": torch.channels_last_3d, "contiguous": torch.contiguous_format}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_steps(model, opt, loss_fn, x, y, steps: int, amp: bool, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(model(x).float(), y)
        loss.backward()
        opt.step()
    _sync(device)
    return (time.perf_counter() - t0) / steps


def timed_mc(model, volume, passes: int, amp: bool, device) -> float:
    """Seconds per batched MC forward (dropout sampling, norms in train mode as sampled)."""
    model.train()
    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                enabled=amp):
        for _ in range(passes):
            model(volume)
    _sync(device)
    return (time.perf_counter() - t0) / passes


def main() -> None:
    params = load_params("params.yaml")
    demo_patch = ",".join(str(v) for v in params.train.patch_size)
    demo_roi = ",".join(str(v) for v in params.cohort.roi_size)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", default=demo_patch, help="training patch x,y,z")
    p.add_argument("--volume", default=demo_roi, help="MC-sampled volume x,y,z")
    p.add_argument("--channels", default=",".join(str(c) for c in params.train.channels))
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--batch", type=int, default=params.train.batch_size)
    p.add_argument("--mc", type=int, default=params.uncertainty.mc_batch,
                   help="MC samples per batched forward (0: no MC timing)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shape = tuple(int(v) for v in args.shape.split(","))
    volume_shape = tuple(int(v) for v in args.volume.split(","))
    channels = tuple(int(v) for v in args.channels.split(","))
    amps = [False, True] if devices.use_amp(device, True) else [False]
    variants = [(layout, amp) for amp in amps for layout in LAYOUTS]

    torch.manual_seed(0)
    base = build_bayesian_unet(args.classes, channels, (2,) * (len(channels) - 1),
                               params.train.dropout, params.train.num_res_units,
                               dropout_depth=params.train.dropout_depth)
    state = {k: v.contiguous() for k, v in base.state_dict().items()}
    models, opts = {}, {}
    for layout, fmt in LAYOUTS.items():
        m = build_bayesian_unet(args.classes, channels, (2,) * (len(channels) - 1),
                                params.train.dropout, params.train.num_res_units,
                                dropout_depth=params.train.dropout_depth)
        m = m.to(device).to(memory_format=fmt)
        m.load_state_dict(state)
        models[layout], opts[layout] = m, torch.optim.AdamW(m.parameters(), lr=1e-3)
    loss_fn = make_loss()
    x = torch.randn(args.batch, 1, *shape, device=device)
    y = torch.randint(0, args.classes, (args.batch, 1, *shape), device=device)
    vol = torch.randn(max(args.mc, 1), 1, *volume_shape, device=device)

    step_t: dict = {v: [] for v in variants}
    mc_t: dict = {v: [] for v in variants}
    for layout, amp in variants:  # warm-up (oneDNN primitives, cuDNN autotune, allocator)
        timed_steps(models[layout], opts[layout], loss_fn, x, y, 2, amp, device)
        if args.mc:
            timed_mc(models[layout], vol, 1, amp, device)
    for _ in range(args.repeats):
        for layout, amp in variants:
            step_t[(layout, amp)].append(timed_steps(models[layout], opts[layout], loss_fn,
                                                     x, y, args.steps, amp, device))
            if args.mc:
                mc_t[(layout, amp)].append(timed_mc(models[layout], vol, 2, amp, device))

    name = (torch.cuda.get_device_name() if device.type == "cuda" else devices.cpu_model())
    rows = []
    for layout, amp in variants:
        step = statistics.median(step_t[(layout, amp)])
        row = {"layout": layout, "precision": "bf16" if amp else "fp32",
               "step_ms": round(step * 1000, 1),
               "step_speedup_vs_contiguous": round(
                   statistics.median(step_t[("contiguous", amp)]) / step, 3),
               "step_speedup_vs_fp32_same_layout": round(
                   statistics.median(step_t[(layout, False)]) / step, 3)}
        if args.mc:
            mc = statistics.median(mc_t[(layout, amp)])
            row |= {"mc_batch_ms": round(mc * 1000, 1),
                    "mc_speedup_vs_contiguous": round(
                        statistics.median(mc_t[("contiguous", amp)]) / mc, 3)}
        rows.append(row)
    out = {"device": name, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
           "load_before": round(os.getloadavg()[0], 2), "torch": torch.__version__,
           "patch": shape, "batch": args.batch, "channels": channels,
           "mc_samples": args.mc, "volume": volume_shape, "steps": args.steps,
           "repeats": args.repeats, "rows": rows}
    print(f"{name}, {out['threads']} torch threads; patch {shape} x {args.batch}, "
          f"channels {channels}; MC {args.mc} x {volume_shape}; torch {torch.__version__}")
    for r in rows:
        mc = (f"  MC batch {r['mc_batch_ms']:8.1f} ms (x{r['mc_speedup_vs_contiguous']:.2f})"
              if args.mc else "")
        print(f"  {r['layout']:13s} {r['precision']}  step {r['step_ms']:7.1f} ms "
              f"(x{r['step_speedup_vs_contiguous']:.2f} vs contiguous){mc}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    if device.type == "cuda":
        print(f"  peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB",
              file=sys.stderr)


if __name__ == "__main__":
    main()
