"""Benchmark of the catalogue's header scan, against baselines on the same files.

    python benchmarks/catalogue.py --files 50000 --json bench.json   # generated CT slices
    python benchmarks/catalogue.py --archive data/archive --json bench-demo.json

Measured in one run, with a warm page cache (every file is read once before timing, so
that disk speed does not decide), each figure a ratio against its baseline of that run:

- per core against GDCM's C++ scanner (``gdcmscanner`` of Debian's ``libgdcm-tools``, ten
  tags; not python-gdcm's wrapper of that name in the venv, a Python start and another
  build): files per CPU-second of the catalogue's scan in one process over those of
  gdcmscanner, on the same files. gdcmscanner aborts on a corrupt file, so with
  ``--archive`` both read a tree of hard links to the files the catalogue accepted (the
  archive's CT images); the catalogue alone also scans the whole archive, distractors and
  all. pydicom's header-only read is the third reader;
- 2 workers against 1: whole processes (a fresh interpreter scanning into a fresh index,
  start-up, imports and the pool included), wall clock and CPU-seconds of the process tree
  (a child subreaper collects the forkserver and its workers), and the same in a warm
  process (the pool kept from an earlier scan);
- the unchanged rescan (``scan`` and ``run()`` end to end) against the first scan;
- peak memory (max RSS of the main process and of the largest worker) of a scan of a
  quarter of the files and of all of them: flat means bounded.

Wall-clock ratios need idle cores; CPU-second ratios stand on a loaded machine too
(``load`` in the output says how loaded it was). Generated files: 16x16 pixels;
``--header realistic`` (default) writes a vendor-like header (~200 elements: private
groups, sequences), ``minimal`` ~40 elements.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

GDCMSCANNER_TAGS = ("0008,0060", "0008,0070", "0008,0080", "0008,1090", "0018,1210",
                    "0018,0050", "0020,000e", "0020,0032", "0020,0037", "0028,0030")
SLICES_PER_SERIES = 50


def generate(root: Path, n_files: int, header: str) -> None:
    """``n_files`` CT slices as SITE/STUDY/SERIES/IMxxxxx.dcm, in 4 equal parts."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    pixels = np.zeros((16, 16), np.int16).tobytes()
    written = 0
    series = 0
    while written < n_files:
        part = min(3, written * 4 // n_files)
        folder = root / f"part{part}" / "A" / f"ST{series:05d}" / "SE002"
        folder.mkdir(parents=True, exist_ok=True)
        study_uid, series_uid = generate_uid(), generate_uid()
        for k in range(min(SLICES_PER_SERIES, n_files - written)):
            ds = Dataset()
            ds.SpecificCharacterSet = "ISO_IR 100"
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            ds.SOPClassUID = CTImageStorage
            ds.SOPInstanceUID = generate_uid()
            ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = "20190304"
            ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = "101010"
            ds.AccessionNumber = "ACC0001"
            ds.Modality = "CT"
            ds.Manufacturer = "GE MEDICAL SYSTEMS"
            ds.InstitutionName = "Hospital A"
            ds.ManufacturerModelName = "Revolution CT"
            ds.PatientName = "Bench^Patient"
            ds.PatientID = f"BENCH{series:05d}"
            ds.PatientBirthDate = "19500101"
            ds.BodyPartExamined = "PELVIS"
            ds.SliceThickness = "1.25"
            ds.KVP = "120"
            ds.Exposure = "150"
            ds.ConvolutionKernel = "STANDARD"
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.SeriesNumber = 2
            ds.InstanceNumber = k + 1
            ds.ImagePositionPatient = [-180.0, -180.0, k * 1.25]
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows = ds.Columns = 16
            ds.PixelSpacing = [0.703125, 0.703125]
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
            ds.PixelRepresentation = 1
            ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"
            if header == "realistic":
                _vendor_elements(ds, Dataset, Sequence, generate_uid, CTImageStorage)
            ds.PixelData = pixels
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = CTImageStorage
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.file_meta = meta
            ds.save_as(folder / f"IM{k + 1:05d}.dcm", enforce_file_format=True)
            written += 1
        series += 1


def _vendor_elements(ds, Dataset, Sequence, generate_uid, sop_class) -> None:  # noqa: N803
    """What a scanner adds: descriptive tags, references, three private groups."""
    ds.StationName = "CT01"
    ds.StudyDescription = "CT PELVIS"
    ds.SeriesDescription = "1.25mm STD"
    ds.OperatorsName = "Op^One"
    ds.ReferringPhysicianName = "Ref^Doc"
    ds.PatientSex = "F"
    ds.PatientAge = "071Y"
    ref = Dataset()
    ref.ReferencedSOPClassUID = sop_class
    ref.ReferencedSOPInstanceUID = generate_uid()
    ds.ReferencedImageSequence = Sequence([ref, ref])
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "P1", "GEIIS", "PELVIS"
    ds.ProcedureCodeSequence = Sequence([code])
    ds.add_new((0x0009, 0x0010), "LO", "GEMS_IDEN_01")
    for e in range(0x1001, 0x1029):
        ds.add_new((0x0009, e), "LO", f"private {e:04x}")
    ds.SoftwareVersions = "gmp_vct"
    ds.DataCollectionDiameter = "500"
    ds.ReconstructionDiameter = "360"
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = "150"
    ds.ExposureTime = "500"
    ds.XRayTubeCurrent = "300"
    ds.FilterType = "BODY FILTER"
    ds.FocalSpots = "1.2"
    ds.PatientPosition = "FFS"
    ds.add_new((0x0019, 0x0010), "LO", "GEMS_ACQU_01")
    for e in range(0x1001, 0x101F):
        ds.add_new((0x0019, e), "DS", "1.5")
    ds.FrameOfReferenceUID = generate_uid()
    ds.PositionReferenceIndicator = "SN"
    ds.add_new((0x0021, 0x0010), "LO", "GEMS_RELA_01")
    for e in range(0x1001, 0x1015):
        ds.add_new((0x0021, e), "SS", 3)
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    ds.add_new((0x0043, 0x0010), "LO", "GEMS_PARM_01")
    for e in range(0x1001, 0x101F):
        ds.add_new((0x0043, e), "SS", 1)


def list_files(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if p.is_file())


def best_of(repeat: int, fn: Callable[[], object],
            clock: Callable[[], float] = time.perf_counter) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return best


def pydicom_header_only(files: list[str]) -> None:
    import pydicom

    for f in files:
        pydicom.dcmread(f, stop_before_pixels=True)


def find_gdcmscanner() -> str | None:
    """Debian's gdcmscanner: the first on PATH outside this venv (python-gdcm installs a
    Python wrapper of that name in its bin folder)."""
    venv_bin = str(Path(sys.prefix, "bin"))
    path = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep)
                           if d and Path(d).resolve() != Path(venv_bin).resolve())
    return shutil.which("gdcmscanner", path=path)


def gdcmscanner(exe: str, root: Path) -> float:
    """Scan ``root`` with gdcmscanner; returns its CPU-seconds (user + system)."""
    cmd = [exe, "-d", str(root), "-r"]
    for tag in GDCMSCANNER_TAGS:
        cmd += ["-t", tag]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def accepted_tree(root: Path, index_dir: Path, dst: Path) -> Path:
    """Hard links (copies across file systems) to the files the catalogue accepted."""
    import pyarrow.parquet as pq

    for part in sorted(index_dir.glob("part-*.parquet")):
        table = pq.read_table(part, columns=["relpath", "relpath_bytes", "reason"])
        for rel, raw, reason in zip(*(table[c].to_pylist() for c in table.column_names),
                                    strict=True):
            if reason is not None:
                continue
            rel = os.fsdecode(raw) if raw is not None else rel
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(root / rel, dst / rel)
            except OSError:
                shutil.copyfile(root / rel, dst / rel)
    return dst


def subreaper() -> None:
    """Adopt orphaned descendants (the forkserver, its workers), so that their CPU time
    reaches RUSAGE_CHILDREN once they are reaped (Linux prctl PR_SET_CHILD_SUBREAPER)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(36, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def whole_process(cmd: list[str]) -> tuple[float, float]:
    """(wall, CPU-seconds of the whole process tree) of ``cmd``; call ``subreaper`` first
    and before this process starts any child of its own that outlives a call."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    while True:  # reap the adopted orphans
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def catalogue_scan(root: Path, index_dir: Path, workers: int) -> object:
    from fedct.catalogue.index import FileIndex
    from fedct.catalogue.pseudonym import DEMO_KEY, PseudonymKey
    from fedct.catalogue.scan import scan

    key = PseudonymKey(DEMO_KEY, demo=True, source="demo")
    with FileIndex(index_dir, key.key_id) as index:
        return scan(root, index, key, workers=workers, progress=False)


class DescendantSampler:
    """Peak RSS (VmHWM) of every descendant process, sampled from /proc.

    Pool workers are children of the forkserver, not of this process, so
    ``RUSAGE_CHILDREN`` never sees them; their high-water mark is read while they live.
    """

    def __init__(self, interval: float = 0.02) -> None:
        import threading

        self.interval, self.peak_kb = interval, 0
        self.ticks: dict[int, int] = {}  # pid -> user+system CPU ticks last seen
        self.start_ticks: dict[int, int] = {}  # of processes alive before the scan
        self._first = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> DescendantSampler:
        self._thread.start()
        return self

    @property
    def cpu_seconds(self) -> float:
        """CPU time the descendants used while sampled (up to one interval short)."""
        ticks = sum(t - self.start_ticks.get(pid, 0) for pid, t in self.ticks.items())
        return ticks / os.sysconf("SC_CLK_TCK")

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = os.getpid()
        while True:
            stopping = self._stop.is_set()
            parents: dict[int, int] = {}
            cpu: dict[int, int] = {}
            for entry in os.scandir("/proc"):
                if entry.name.isdigit():
                    try:
                        fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
                        parents[int(entry.name)] = int(fields[1])
                        cpu[int(entry.name)] = int(fields[11]) + int(fields[12])
                    except (OSError, ValueError, IndexError):
                        continue
            for pid in parents:
                p, depth = pid, 0
                while p in parents and p != me and depth < 5:
                    p, depth = parents[p], depth + 1
                if p == me and pid != me:
                    self.ticks[pid] = cpu[pid]
                    if self._first:
                        self.start_ticks[pid] = cpu[pid]
                    try:
                        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                            if line.startswith("VmHWM:"):
                                self.peak_kb = max(self.peak_kb, int(line.split()[1]))
                    except OSError:
                        pass
            self._first = False
            if stopping:
                return
            self._stop.wait(self.interval)


def measure_memory(root: Path, workers: int) -> dict:
    """Peak memory of a scan in a fresh interpreter (this function runs in that child)."""
    import tracemalloc

    tracemalloc.start()
    with tempfile.TemporaryDirectory() as tmp, DescendantSampler() as sampler:
        stats = catalogue_scan(root, Path(tmp) / "index", workers)
    _, peak = tracemalloc.get_traced_memory()
    return {
        "n_files": stats.n_files,  # type: ignore[attr-defined]
        "main_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_max_rss_mb": sampler.peak_kb / 1024,
        "main_python_peak_mb": peak / 2**20,
    }


def memory_in_child(root: Path, workers: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--_memory", str(root), str(workers)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def scan_in_child(root: Path, index_dir: Path, workers: int) -> None:
    """``--_scan``: one scan, as a fresh process does it."""
    shutil.rmtree(index_dir, ignore_errors=True)
    catalogue_scan(root, index_dir, workers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=5000, help="files to generate [5000]")
    ap.add_argument("--header", choices=("realistic", "minimal"), default="realistic")
    ap.add_argument("--archive", type=Path, help="benchmark an existing archive instead")
    ap.add_argument("--repeat", type=int, default=3, help="best of N timings [3]")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--_memory", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--_scan", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._memory:
        print(json.dumps(measure_memory(Path(args._memory[0]), int(args._memory[1]))))
        return
    if args._scan:
        scan_in_child(Path(args._scan[0]), Path(args._scan[1]), int(args._scan[2]))
        return
    subreaper()  # before any child of this process: whole_process reaps every orphan
    from fedct.config import CatalogueParams
    from fedct.stages import catalogue as stage

    tmp = Path(tempfile.mkdtemp(prefix="fedct-bench-"))
    try:
        if args.archive:
            root = args.archive.resolve()
        else:
            root = tmp / "archive"
            t0 = time.perf_counter()
            generate(root, args.files, args.header)
            print(f"generated {args.files} files ({args.header} header) in "
                  f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
        files = list_files(root)
        n = len(files)
        for f in files:  # warm the page cache: measure parsing, not the disk
            Path(f).read_bytes()
        results: dict[str, Any] = {
            "n_files": n, "header": "archive" if args.archive else args.header,
            "cpu_model": cpu_model(), "cpus": os.cpu_count(), "repeat": args.repeat,
            "load_before": round(os.getloadavg()[0], 2)}
        # 2 workers against 1, whole processes (first: no child of ours may outlive them).
        whole = {}
        for w in (1, 2):
            runs = [whole_process([sys.executable, __file__, "--_scan", str(root),
                                   str(tmp / f"whole{w}"), str(w)])
                    for _ in range(args.repeat)]
            whole[w] = {"wall_s": round(min(r[0] for r in runs), 3),
                        "cpu_s": round(min(r[1] for r in runs), 3)}
        results["whole_process"] = whole
        results["speedup_2_workers_whole_process"] = round(
            whole[1]["wall_s"] / whole[2]["wall_s"], 2)
        results["cpu_ratio_2_to_1_workers_whole_process"] = round(
            whole[2]["cpu_s"] / whole[1]["cpu_s"], 2)
        # The same in this process, warm (imports done, the pool kept from the first scan).
        warm = {}
        for w in (1, 2):
            catalogue_scan(root, tmp / f"warm{w}", w)  # imports, the pool

            def first_scan(w: int = w) -> None:
                shutil.rmtree(tmp / f"warm{w}", ignore_errors=True)
                catalogue_scan(root, tmp / f"warm{w}", w)

            warm[w] = best_of(args.repeat, first_scan)
        results["warm_scan_s"] = {w: round(v, 3) for w, v in warm.items()}
        results["speedup_2_workers_warm"] = round(warm[1] / warm[2], 2)
        # Per core: CPU-seconds of one process on the same files, gdcmscanner's files.
        same = root
        if args.archive:
            same = accepted_tree(root, tmp / "warm1", tmp / "accepted")
        same_files = list_files(same)
        for f in same_files:
            Path(f).read_bytes()
        m = len(same_files)
        results["n_files_per_core"] = m

        def scan_same() -> None:
            shutil.rmtree(tmp / "same", ignore_errors=True)
            catalogue_scan(same, tmp / "same", 1)

        scan_same()
        cpu = {"catalogue scan, 1 process": best_of(args.repeat, scan_same,
                                                    time.process_time),
               "pydicom header-only": best_of(args.repeat,
                                              lambda: pydicom_header_only(same_files),
                                              time.process_time)}
        exe = find_gdcmscanner()
        if exe:
            version = subprocess.run([exe, "--version"], capture_output=True, text=True)
            results["gdcmscanner"] = f"{exe}: {version.stdout.strip()}"
            cpu["gdcmscanner, 10 tags"] = min(gdcmscanner(exe, same)
                                              for _ in range(args.repeat))
        else:
            print("gdcmscanner not installed (Debian: apt-get install libgdcm-tools); "
                  "skipping that baseline", file=sys.stderr)
        results["files_per_cpu_second"] = {k: round(m / v) for k, v in cpu.items()}
        ours = cpu["catalogue scan, 1 process"]
        results["per_core_vs_pydicom"] = round(cpu["pydicom header-only"] / ours, 2)
        if exe:
            results["per_core_vs_gdcmscanner"] = round(cpu["gdcmscanner, 10 tags"] / ours, 2)
        # The unchanged rescan against the first scan.
        rescan = best_of(args.repeat, lambda: catalogue_scan(root, tmp / "warm2", 2))
        results["scan_unchanged_rescan_s"] = round(rescan, 4)
        results["scan_rescan_ratio"] = round(warm[2] / rescan, 1)
        params = CatalogueParams(workers=2)
        out = tmp / "out"
        t0 = time.perf_counter()
        stage.run(params, root, out, track=False, progress=False)
        run_first = time.perf_counter() - t0
        run_rescan = best_of(args.repeat, lambda: stage.run(params, root, out, track=False,
                                                            progress=False))
        results["run_first_s"] = round(run_first, 3)
        results["run_unchanged_rescan_s"] = round(run_rescan, 4)
        results["run_rescan_ratio"] = round(run_first / run_rescan, 1)
        if not args.archive:  # memory: a quarter of the archive vs all of it
            results["memory"] = {"quarter": memory_in_child(root / "part0", 2),
                                 "all": memory_in_child(root, 2)}
        results["load_after"] = round(os.getloadavg()[0], 2)
        print(json.dumps(results, indent=1))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1) + "\n")
        print(_table(results), file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _table(r: dict) -> str:
    w = r["whole_process"]
    lines = [f"\n{r['n_files']} files ({r['header']}), {r['cpu_model']}, {r['cpus']} CPUs, "
             f"best of {r['repeat']}, load {r['load_before']} -> {r['load_after']}",
             f"2 workers / 1 worker, whole process: wall x{r['speedup_2_workers_whole_process']}"
             f" ({w[1]['wall_s']} -> {w[2]['wall_s']} s), CPU-s x"
             f"{r['cpu_ratio_2_to_1_workers_whole_process']} ({w[1]['cpu_s']} -> "
             f"{w[2]['cpu_s']}); warm process: wall x{r['speedup_2_workers_warm']}",
             f"per core ({r['n_files_per_core']} files): files per CPU-second "
             f"{r['files_per_cpu_second']}; vs pydicom x{r['per_core_vs_pydicom']}"
             + (f", vs gdcmscanner x{r['per_core_vs_gdcmscanner']}"
                if "per_core_vs_gdcmscanner" in r else ""),
             f"unchanged rescan: scan {r['scan_rescan_ratio']}x faster, "
             f"run() {r['run_rescan_ratio']}x faster"]
    for k, m in r.get("memory", {}).items():
        lines.append(f"memory ({k}, {m['n_files']} files): main max RSS "
                     f"{m['main_max_rss_mb']:.0f} MB, worker max RSS "
                     f"{m['worker_max_rss_mb']:.0f} MB, main Python peak "
                     f"{m['main_python_peak_mb']:.1f} MB")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
