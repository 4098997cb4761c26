"""The fixed cost of a command: whole processes, wall clock and CPU-seconds of the tree.

    python benchmarks/fixed_cost.py --archive data/archive --json fixed.json
    python benchmarks/fixed_cost.py --archive data/archive \\
        --predict models:/fedct-seg@champion outputs/some_series_folder

Measured in one run, best of ``--repeat``, each against the baselines of the same run: an
empty interpreter (``python -c pass``) and the imports that every command used to pay
(``import monai``, ``import mlflow``). The commands: ``fedct --help``; the unchanged rescan
of ``--archive`` (``fedct catalogue`` after a first run into a scratch folder, the
pipeline's params; it must say "up to date"); with ``--predict MODEL INPUT``, ``fedct
predict`` of one series. Targets (issue 28): rescan <= 4 s, predict <= 10 s, on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from catalogue import cpu_model, subreaper, whole_process  # noqa: E402

# The console script a user runs (this venv's), else the same entry point by -c.
_SCRIPT = Path(sys.executable).with_name("fedct")
FEDCT = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-c",
                                                 "from fedct.cli import main; main()"]


def best(repeat: int, cmd: list[str]) -> dict[str, float]:
    runs = [whole_process(cmd) for _ in range(repeat)]
    return {"wall_s": round(min(r[0] for r in runs), 3),
            "cpu_s": round(min(r[1] for r in runs), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archive", type=Path, help="an archive to rescan")
    ap.add_argument("--predict", nargs=2, metavar=("MODEL", "INPUT"),
                    help="time `fedct predict MODEL INPUT`")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    subreaper()
    tmp = Path(tempfile.mkdtemp(prefix="fedct-fixed-"))
    try:
        out: dict = {"cpu_model": cpu_model(), "cpus": os.cpu_count(),
                     "repeat": args.repeat, "load_before": round(os.getloadavg()[0], 2),
                     "bytecode_cache": not sys.dont_write_bytecode}
        t = out["seconds"] = {}
        t["python -c pass"] = best(args.repeat, [sys.executable, "-c", "pass"])
        for mod in ("monai", "mlflow", "torch", "pandas"):
            t[f"import {mod}"] = best(args.repeat, [sys.executable, "-c", f"import {mod}"])
        t["fedct --help"] = best(args.repeat, [*FEDCT, "--help"])
        if args.archive:
            cmd = [*FEDCT, "catalogue", str(args.archive.resolve()), str(tmp / "catalogue")]
            t["fedct catalogue, first run"] = best(1, cmd)
            t["fedct catalogue, unchanged rescan"] = best(args.repeat, cmd)
        if args.predict:
            model, inp = args.predict
            t["fedct predict, one series"] = best(args.repeat, [*FEDCT, "predict", model, inp,
                                                                "-o", str(tmp / "pred")])
        monai = t["import monai"]["wall_s"]
        out["ratio_to_import_monai_wall"] = {k: round(v["wall_s"] / monai, 2)
                                             for k, v in t.items()}
        out["load_after"] = round(os.getloadavg()[0], 2)
        text = json.dumps(out, indent=1)
        print(text)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(text + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
