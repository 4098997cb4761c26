"""The train stage's worker processes against one process: wall time of the same models.

Runs the stage's own ``fedct.stages.train.run_sites`` twice on one prepared cohort, the
same sites and a shortened step cap: once with ``train.workers = 1`` (one process, every
thread, the models one after another: the baseline) and once with ``--workers`` processes
(threads shared out), interleaved ``--repeats`` times in alternating order so that
drifting load hits both, and reports the median wall times and the speed-up baseline /
parallel. The models land in a scratch folder and MLflow in a scratch store (the run
works there); nothing of the workspace changes.

    python benchmarks/train_parallel.py outputs/cohort --sites A B --steps 100

Measured on 2 AMD EPYC cores with AVX512-BF16 (2026-12-04, demo network, development
cohort 2026/7, sites A and B): 400 steps each 159.8 s against 126.3 s, x1.27; 150 steps
each x1.04 (each worker's start, about 15 s, weighs more on short trainings).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fedct.config import load_params
from fedct.stages.train import run_sites

ROOT = Path(__file__).parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cohort", type=Path)
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--sites", nargs="+", default=["A", "B"])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    if args.workers < 2:
        ap.error("--workers must be >= 2 (1 is the baseline)")
    base = dataclasses.replace(load_params(args.params).train, steps=args.steps,
                               sites=tuple(args.sites))
    times: dict[int, list[float]] = {1: [], args.workers: []}
    cohort, here = args.cohort.resolve(), Path.cwd()
    with tempfile.TemporaryDirectory(prefix="fedct-train-bench-") as tmp:
        # MLflow's store and artifacts (./mlruns) in the scratch folder, not the workspace.
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        os.chdir(tmp)
        try:
            for r in range(args.repeats):
                # Alternating order: neither setting always runs on a cold or a warm machine.
                for workers in (list(times) if r % 2 == 0 else list(times)[::-1]):
                    params = dataclasses.replace(base, workers=workers)
                    t0 = time.perf_counter()
                    run_sites(params, params.sites, cohort, Path(tmp) / f"m{r}-{workers}")
                    times[workers].append(time.perf_counter() - t0)
        finally:
            os.chdir(here)
    seq, par = (statistics.median(times[w]) for w in times)
    print(f"threads {torch.get_num_threads()}, sites {list(args.sites)}, "
          f"{args.steps} steps each, {args.repeats} repeat(s)")
    print(f"workers 1 (baseline): {seq:.1f} s; workers {args.workers}: {par:.1f} s; "
          f"speed-up x{seq / par:.2f}")


if __name__ == "__main__":
    main()
