"""Time batched MC-dropout sampling against a loop of T single forward passes.

Both methods run in the same process on the same model, weights and input, through the same
code (``mc_predict`` with ``batch=T``; ``mc_predict_loop`` is ``mc_predict`` with
``batch=1``), each warmed up first. Repeats are interleaved (loop, batched, loop,
batched...) so that load drifting on a shared machine hits both alike; the table reports
medians. On CUDA every timing is bracketed by
``torch.cuda.synchronize()`` and, with ``--amp``, both methods are timed with and without
autocast.

    python benchmarks/mc_dropout.py --samples 10 --repeats 5 --device cpu

By default the network and input are the pipeline's (``train.channels`` and
``cohort.roi_size`` of ``params.yaml``); ``--channels`` and ``--shape`` override them.

Why batching wins on CPU: for a batch of one, PyTorch's kernel heuristic sends every 3D
convolution with a small input (here all levels below full resolution) to its reference
kernel ``slow_conv3d``; with a batch above one all go to oneDNN (check with
``torch.profiler``). The per-call overhead is also paid T times by the loop. What batching
cannot remove: dropout masks, norm and activations cost the same per sample either way
(``fedct.model.unet.MCDropout`` draws CPU masks from packed random bits, ~4x cheaper than the
``bernoulli_`` of ``nn.Dropout``, which was half of a batched forward), and glibc serves
every tensor above 32 MB with a fresh ``mmap``, so batched activations are page-faulted
in anew on every op (the ``faults`` column). Keeping freed
memory in the process removes that cost for both methods, e.g. ``MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=68719476736`` (glibc) or ``THP_MEM_ALLOC_ENABLE=1`` (PyTorch's
huge-page allocation); the header line prints which of these are set.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

import torch

from fedct.config import load_params
from fedct.model.mc import mc_predict, mc_predict_loop
from fedct.model.unet import build_bayesian_unet

ALLOCATOR_ENV = (
    "MALLOC_MMAP_MAX_",
    "MALLOC_TRIM_THRESHOLD_",
    "THP_MEM_ALLOC_ENABLE",
    "LD_PRELOAD",
    "OMP_NUM_THREADS",
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=str, default=None, help="input X,Y,Z (default roi_size)")
    p.add_argument("--samples", type=int, default=10, help="T, MC samples per image")
    p.add_argument("--batch", type=int, default=None, help="samples per forward (default T)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per method")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--amp", action="store_true", help="on CUDA also time with autocast")
    p.add_argument("--n-classes", type=int, default=11,
                   help="output classes (phantom: 10 structures + background)")
    p.add_argument("--channels", type=str, default=None, help="default train.channels")
    p.add_argument("--params", type=str, default="params.yaml")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p.parse_args()


class Run(NamedTuple):
    wall_s: float
    cpu_s: float  # user + system CPU of this process: less sensitive to other load
    minor_faults: int  # page faults, i.e. fresh memory being touched


def timed(fn: Callable[[], torch.Tensor], device: torch.device) -> Run:
    """Time one call; CUDA work is synchronised on both sides."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return Run(wall, cpu, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    params = load_params(args.params)
    if args.channels:
        channels = tuple(int(c) for c in args.channels.split(","))
        strides = (2,) * (len(channels) - 1)
    else:
        channels, strides = tuple(params.train.channels), tuple(params.train.strides)
    shape = (tuple(int(c) for c in args.shape.split(",")) if args.shape
             else tuple(params.cohort.roi_size))
    t, batch = args.samples, args.batch or args.samples

    torch.manual_seed(0)
    model = build_bayesian_unet(
        args.n_classes, channels=channels, strides=strides
    ).to(device)
    image = torch.randn(1, 1, *shape, device=device)

    variants: dict[str, Callable[[], torch.Tensor]] = {}
    for amp in [False, True] if (args.amp and device.type == "cuda") else [False]:
        tag = " amp" if amp else ""
        variants[f"loop{tag}"] = lambda amp=amp: mc_predict_loop(
            model, image, n_samples=t, amp=amp, seed=0
        )
        variants[f"batched{tag}"] = lambda amp=amp: mc_predict(
            model, image, n_samples=t, batch=batch, amp=amp, seed=0
        )

    for fn in variants.values():  # warm-up: allocator, kernel selection, cuDNN autotune
        fn()
    runs: dict[str, list[Run]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            runs[name].append(timed(fn, device))

    def median(method: str, field: str) -> float:
        return statistics.median(getattr(r, field) for r in runs[method])

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device={name} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"input=1x1x{'x'.join(map(str, shape))} channels={channels} C={args.n_classes} T={t} "
        f"batch={batch} repeats={args.repeats} (medians)"
    )
    tuning = {k: os.environ[k] for k in ALLOCATOR_ENV if k in os.environ}
    print(f"allocator settings: {tuning or 'defaults'}")
    print(f"{'method':<12}{'wall s':>8}{'ms/sample':>11}{'cpu s':>8}{'faults':>9}{'speed-up':>10}")
    for method in runs:
        wall = median(method, "wall_s")
        print(
            f"{method:<12}{wall:>8.3f}{1000 * wall / t:>11.1f}{median(method, 'cpu_s'):>8.2f}"
            f"{median(method, 'minor_faults'):>9.0f}{median('loop', 'wall_s') / wall:>9.2f}x"
        )
    print(
        f"batched vs loop (fp32): {median('loop', 'wall_s') / median('batched', 'wall_s'):.2f}x "
        f"wall, {median('loop', 'cpu_s') / median('batched', 'cpu_s'):.2f}x CPU time"
    )


if __name__ == "__main__":
    main()
