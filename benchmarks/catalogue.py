"""Benchmark of the catalogue's header scan, against two baselines on the same files.

    python benchmarks/catalogue.py                      # 5000 generated CT slices
    python benchmarks/catalogue.py --files 20000 --header minimal
    python benchmarks/catalogue.py --archive /data/archive --repeat 1

Measured in one run, on the same files, with a warm page cache (every file is read
once before timing, so that disk speed does not decide):

- pydicom header-only: ``dcmread(stop_before_pixels=True)`` of every file, one process;
- gdcmscanner: GDCM's C++ scanner (Debian ``libgdcm-tools``) with ten tags, one
  process; skipped with a message when it is not installed;
- python-gdcm ``gdcm.Scanner`` with the catalogue's tags (the catalogue's tier 2);
- the catalogue's scan (walk, read, pseudonymise, index) with 1 and 2 workers, and an
  unchanged rescan; then ``run()`` end to end (with reports) and its rescan;
- peak memory (max RSS of the main process and of the largest worker) of a scan of a
  quarter of the files and of all of them: flat means bounded.

Generated files: 16x16 pixels; ``--header realistic`` (default) writes a vendor-like
header (~200 elements: private groups, sequences), ``minimal`` ~40 elements.
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


def gdcm_python(files: list[str]) -> None:
    from fedct import dicom

    for i in range(0, len(files), 256):
        dicom.read_headers(files[i:i + 256], engine="gdcm")


def gdcmscanner(root: Path) -> None:
    cmd = ["gdcmscanner", "-d", str(root), "-r"]
    for tag in GDCMSCANNER_TAGS:
        cmd += ["-t", tag]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


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


def cpu_per_file(root: Path, index_dir: Path, workers: int, n: int) -> float:
    """CPU seconds per 1000 files of a first scan: this process plus its workers.

    Robust to other load on a shared machine: equal CPU per file with 1 and 2
    workers means the work divides without overhead, i.e. near-linear scaling where
    cores are free.
    """
    shutil.rmtree(index_dir, ignore_errors=True)
    with DescendantSampler(0.01) as sampler:
        t0 = time.process_time()
        catalogue_scan(root, index_dir, workers)
        main = time.process_time() - t0
    return 1000 * (main + sampler.cpu_seconds) / n


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=5000, help="files to generate [5000]")
    ap.add_argument("--header", choices=("realistic", "minimal"), default="realistic")
    ap.add_argument("--archive", type=Path, help="benchmark an existing archive instead")
    ap.add_argument("--repeat", type=int, default=3, help="best of N timings [3]")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--_memory", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._memory:
        print(json.dumps(measure_memory(Path(args._memory[0]), int(args._memory[1]))))
        return
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
        results: dict[str, object] = {"n_files": n, "header": args.header,
                                      "cpus": os.cpu_count(), "repeat": args.repeat}
        rate: dict[str, float] = {}
        rate["pydicom header-only (1 process)"] = n / best_of(
            args.repeat, lambda: pydicom_header_only(files))
        if shutil.which("gdcmscanner"):
            rate["gdcmscanner, 10 tags (1 process)"] = n / best_of(
                args.repeat, lambda: gdcmscanner(root))
        else:
            print("gdcmscanner not installed (Debian: apt-get install libgdcm-tools); "
                  "skipping that baseline", file=sys.stderr)
        rate["python-gdcm Scanner, catalogue tags (1 process)"] = n / best_of(
            args.repeat, lambda: gdcm_python(files))
        for workers in (1, 2):
            def first_scan(w: int = workers) -> None:
                shutil.rmtree(tmp / "index", ignore_errors=True)
                catalogue_scan(root, tmp / "index", w)

            rate[f"catalogue scan, {workers} worker(s)"] = n / best_of(args.repeat,
                                                                       first_scan)
        rescan = best_of(args.repeat, lambda: catalogue_scan(root, tmp / "index", 2))
        # CPU seconds of this process: robust to other load on a shared machine
        # (single-process readers only; pool workers run elsewhere).
        cpu = {
            "pydicom header-only": n / best_of(args.repeat, lambda: pydicom_header_only(files),
                                               time.process_time),
            "python-gdcm Scanner": n / best_of(args.repeat, lambda: gdcm_python(files),
                                               time.process_time),
        }

        def scan_1() -> None:
            shutil.rmtree(tmp / "index1", ignore_errors=True)
            catalogue_scan(root, tmp / "index1", 1)

        cpu["catalogue scan, 1 worker"] = n / best_of(args.repeat, scan_1, time.process_time)
        catalogue_scan(root, tmp / "warm", 2)  # start the forkserver outside the timing
        cpu_k = {w: min(cpu_per_file(root, tmp / f"cpu{w}", w, n) for _ in range(args.repeat))
                 for w in (1, 2)}
        results["cpu_s_per_1000_files"] = {w: round(v, 3) for w, v in cpu_k.items()}
        results["parallel_efficiency_2_workers"] = round(cpu_k[1] / cpu_k[2], 2)
        results["files_per_cpu_second"] = {k: round(v) for k, v in cpu.items()}
        results["cpu_vs_pydicom"] = round(cpu["catalogue scan, 1 worker"]
                                          / cpu["pydicom header-only"], 2)
        results["files_per_second"] = {k: round(v) for k, v in rate.items()}
        base = rate["pydicom header-only (1 process)"]
        per_worker = {w: rate[f"catalogue scan, {w} worker(s)"] / w for w in (1, 2)}
        results["per_worker_vs_pydicom"] = {w: round(v / base, 2) for w, v in
                                            per_worker.items()}
        if "gdcmscanner, 10 tags (1 process)" in rate:
            results["per_worker_vs_gdcmscanner"] = {
                w: round(v / rate["gdcmscanner, 10 tags (1 process)"], 2)
                for w, v in per_worker.items()}
        results["speedup_2_workers"] = round(
            rate["catalogue scan, 2 worker(s)"] / rate["catalogue scan, 1 worker(s)"], 2)
        first = n / rate["catalogue scan, 2 worker(s)"]
        results["scan_first_s"] = round(first, 3)
        results["scan_unchanged_rescan_s"] = round(rescan, 4)
        results["scan_rescan_ratio"] = round(first / rescan, 1)
        # End to end, with the aggregation and the reports.
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
        # Memory: a quarter of the archive vs all of it (generated archives only).
        if not args.archive:
            results["memory"] = {
                "quarter": memory_in_child(root / "part0", 2),
                "all": memory_in_child(root, 2),
            }
        print(json.dumps(results, indent=1))
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
        print(_table(results, rate), file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _table(results: dict, rate: dict[str, float]) -> str:
    lines = [f"\n{results['n_files']} files ({results['header']} header), "
             f"{results['cpus']} CPUs, best of {results['repeat']}",
             "| reader | files/s |", "|---|---|"]
    lines += [f"| {k} | {v:,.0f} |" for k, v in rate.items()]
    lines.append(f"per worker vs pydicom: {results['per_worker_vs_pydicom']}")
    lines.append(f"files per CPU-second: {results['files_per_cpu_second']} "
                 f"(catalogue / pydicom = {results['cpu_vs_pydicom']})")
    if "per_worker_vs_gdcmscanner" in results:
        lines.append(f"per worker vs gdcmscanner: {results['per_worker_vs_gdcmscanner']}")
    lines.append(f"2 workers / 1 worker (wall): {results['speedup_2_workers']}; CPU s per "
                 f"1000 files (main + workers) {results['cpu_s_per_1000_files']}: parallel "
                 f"efficiency {results['parallel_efficiency_2_workers']}")
    lines.append(f"unchanged rescan: scan {results['scan_rescan_ratio']}x faster, "
                 f"run() {results['run_rescan_ratio']}x faster")
    if "memory" in results:
        for k, m in results["memory"].items():
            lines.append(f"memory ({k}, {m['n_files']} files): main max RSS "
                         f"{m['main_max_rss_mb']:.0f} MB, worker max RSS "
                         f"{m['worker_max_rss_mb']:.0f} MB, main Python peak "
                         f"{m['main_python_peak_mb']:.1f} MB")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
