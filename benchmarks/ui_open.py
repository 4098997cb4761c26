"""Time ``fedct ui`` until headless Chromium has rendered its runs and its registry page.

    python benchmarks/ui_open.py --json results/benchmarks/ui-open.json
    python benchmarks/ui_open.py --store path/to/mlflow.db --shots results/benchmarks

From launching ``fedct ui --store STORE`` (a subprocess, as a user starts it) to: the two
URLs printed; Chromium (Debian's ``chromium``, headless, offline except loopback, started
once the URLs are printed) having rendered the runs page; then, in a second tab of the same
browser (as a reader clicks the second link), the registry page. MLflow 3's UI is a
single-page app that renders through JavaScript after the HTML arrives, so a page counts
as rendered when its visible text (``document.body.innerText``, polled every 0.1 s over
the DevTools protocol on a pipe) holds what it must show: the run name ``train-A`` on the
runs page, ``fedct-seg`` and its ``champion`` alias on the registry page (those of the
default store; ``--expect-run``/``--model``/``--alias`` for another store). Also recorded:
CPU-seconds of the ``fedct ui`` process tree (it and the MLflow server with its workers)
and of Chromium's, the CPU model and the load average before and after. Target (issue 26):
both pages within 15 s on 2 cores. Without ``--store`` a small store is written first, the
one ``tests/test_ui.py`` uses (``tests/mlflow_store.py``). Every process started here is
stopped by its PID (``fedct ui`` by Ctrl-C, which stops the server's group; Chromium's
process group).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from catalogue import cpu_model  # noqa: E402

TARGET_S = 15.0
# The console script a user runs (this venv's), else the same entry point by -c.
_SCRIPT = Path(sys.executable).with_name("fedct")
FEDCT = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-c",
                                                 "from fedct.cli import main; main()"]
# No network but loopback (which a proxy setting bypasses), as on a hospital network that
# blocks CDNs: every other request goes to a closed port.
OFFLINE = ("--proxy-server=127.0.0.1:9",)
_CLK = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """Something did not start, render or stop; the message says what and shows logs."""


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


# --- CPU-seconds of a process tree, from /proc -------------------------------------------

def _stat(pid: int) -> tuple[int, float] | None:
    """(parent PID, CPU-seconds of the process and of its reaped children)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()  # after "pid (comm) "
    # fields[1] = ppid; fields[11:15] = utime, stime, cutime, cstime
    return int(fields[1]), sum(int(f) for f in fields[11:15]) / _CLK


def tree_cpu_s(root: int) -> float:
    """CPU-seconds used so far by ``root`` and every live descendant (and reaped ones)."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (s := _stat(int(entry.name))) is not None:
            stats[int(entry.name)] = s
    tree, frontier = set(), {root}
    while frontier:
        tree |= frontier
        frontier = {pid for pid, (ppid, _) in stats.items() if ppid in frontier} - tree
    return round(sum(stats[pid][1] for pid in tree if pid in stats), 2)


# --- Chromium over the DevTools protocol on a pipe (no websocket library) ----------------

@dataclass
class Chromium:
    """A headless Chromium in its own process group, driven over ``--remote-debugging-pipe``
    (commands to its fd 3, answers from its fd 4, each JSON message ended by a NUL)."""

    proc: subprocess.Popen
    to_browser: int
    from_browser: int
    _buf: bytes = b""
    _next_id: int = 0
    log: Path | None = None
    _targets: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, exe: str, workdir: Path, size: tuple[int, int] = (1400, 900)) -> Chromium:
        cmd_r, cmd_w = os.pipe()
        out_r, out_w = os.pipe()

        # In the child, before exec. os.dup2 makes 3 and 4 inheritable; every other fd of
        # this process is not (PEP 446), so close_fds=False passes these two only.
        def to_fds_3_and_4() -> None:
            a, b = os.dup(cmd_r), os.dup(out_w)  # above 4, so neither dup2 clobbers
            os.dup2(a, 3)
            os.dup2(b, 4)

        workdir.mkdir(parents=True, exist_ok=True)
        log = workdir / "chromium.log"
        cmd = [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
               "--disable-crash-reporter", "--disable-breakpad", "--disable-extensions",
               "--no-default-browser-check", *OFFLINE, f"--window-size={size[0]},{size[1]}",
               f"--user-data-dir={workdir / 'profile'}", "--remote-debugging-pipe",
               "about:blank"]
        with open(log, "wb") as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                    env={**os.environ, "HOME": str(workdir)},
                                    start_new_session=True, close_fds=False,
                                    preexec_fn=to_fds_3_and_4)
        os.close(cmd_r)
        os.close(out_w)
        return cls(proc, cmd_w, out_r, log=log)

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.from_browser], [], [], left)[0]:
                raise BenchError(f"chromium did not answer in time; {self._tail()}")
            chunk = os.read(self.from_browser, 1 << 20)
            if not chunk:
                raise BenchError(f"chromium closed its pipe; {self._tail()}")
            self._buf += chunk
        message, self._buf = self._buf.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 60.0) -> dict:
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.to_browser, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            answer = self._read_message(deadline)
            if answer.get("id") == self._next_id:  # events (no id) are not needed here
                if "error" in answer:
                    raise BenchError(f"{method}: {answer['error']}")
                return answer["result"]

    def open_tab(self, url: str) -> str:
        """Open ``url`` in a new tab; returns the tab's session id."""
        target = self.call("Target.createTarget", {"url": url})["targetId"]
        return self.call("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"]

    def text(self, session: str) -> str:
        expr = "document.body ? document.body.innerText : ''"
        return self.call("Runtime.evaluate", {"expression": expr, "returnByValue": True},
                         session)["result"].get("value", "")

    def wait_for_text(self, session: str, expected: tuple[str, ...], timeout: float,
                      poll: float = 0.1) -> str:
        """The tab's visible text once it holds every one of ``expected``."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.text(session)
            if all(e in text for e in expected):
                return text
            if "ERR_" in text and "Details" in text:  # Chromium's own error page
                raise BenchError(f"chromium could not load the page: {text[:400]!r}")
            if time.monotonic() > deadline:
                raise BenchError(f"after {timeout:.0f} s the page shows none of / not all "
                                 f"of {expected}; its text: {text[:800]!r}")
            time.sleep(poll)

    def screenshot(self, session: str, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", {"format": "png"}, session)["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def _tail(self) -> str:
        log = self.log.read_text(errors="replace")[-1500:] if self.log else ""
        return f"chromium exit {self.proc.poll()}, its log: {log}"

    def stop(self) -> None:
        """Close the browser, then stop its process group by its PID (id = its PID)."""
        try:
            if self.proc.poll() is None:
                self.call("Browser.close", timeout=10)
                self.proc.wait(timeout=10)
        except (BenchError, OSError, subprocess.TimeoutExpired):
            pass
        finally:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
            for fd in (self.to_browser, self.from_browser):
                os.close(fd)
            _wait_group_gone(self.proc.pid)


def _wait_group_gone(pgid: int, timeout: float = 10.0) -> None:
    """Until the killed group's last members (zombies until init reaps them) are gone."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise BenchError(f"process group {pgid} still alive {timeout:.0f} s after SIGKILL")


# --- fedct ui ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Expected:
    """What the two pages must show: the study's run, the model and its alias."""

    run: str = "train-A"
    model: str = "fedct-seg"
    alias: str = "champion"

    def runs(self) -> tuple[str, ...]:
        return (self.run,)

    def registry(self) -> tuple[str, ...]:
        return (self.model, self.alias)


def _start_ui(store: Path, port: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.Popen(
        [*FEDCT, "ui", "--store", str(store), "--port", str(port)], env=env,
        cwd=store.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL)


def _read_urls(ui: subprocess.Popen, timeout: float) -> tuple[list[str], dict[str, str]]:
    """The lines ``fedct ui`` printed up to the registry URL, and the URLs by label."""
    assert ui.stdout is not None
    fd = ui.stdout.fileno()  # read unbuffered: select() sees only what is still in the pipe
    buf = b""
    deadline = time.monotonic() + timeout
    while b"registered model:" not in buf or not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise BenchError(f"fedct ui printed no URLs in {timeout:.0f} s: {buf.decode()}")
        chunk = os.read(fd, 65536)
        if not chunk:
            raise BenchError(f"fedct ui exited {ui.wait()}: {buf.decode()}")
        buf += chunk
    lines = buf.decode().splitlines()
    urls = {label: url.strip() for label, url in
            (line.split(":", 1) for line in lines if line.startswith(("runs of", "registered")))}
    return lines, urls


def _server_pid(lines: list[str]) -> int | None:
    for line in lines:
        if "server PID " in line:
            return int(line.split("server PID ", 1)[1].split(",")[0].split(")")[0])
    return None


def _stop_ui(ui: subprocess.Popen, server_pid: int | None) -> str:
    """Ctrl-C to ``fedct ui`` (it stops the server's process group); returns its output.
    If it does not exit, it and the server's group are killed by their PIDs."""
    if ui.poll() is None:
        ui.send_signal(signal.SIGINT)
    try:
        out, _ = ui.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        ui.kill()
        out, _ = ui.communicate()
    out = out.decode(errors="replace") if out else ""
    if server_pid is not None:
        try:
            os.killpg(server_pid, signal.SIGKILL)  # nothing left, unless ui failed to stop it
        except ProcessLookupError:
            pass
    return out


def open_ui(store: Path, chromium: str, workdir: Path, expected: Expected = Expected(),
            shots: Path | None = None, timeout_s: float = 180.0) -> dict:
    """Launch ``fedct ui`` on ``store``, render its two pages in Chromium; the timings.

    Raises:
        BenchError: ui printed no URLs, a page did not show what it must within
            ``timeout_s``, or Chromium failed.
    """
    from fedct.mlflow_server import free_port

    workdir.mkdir(parents=True, exist_ok=True)
    result: dict = {"store": str(store), "chromium": chromium,
                    "load_before": [round(x, 2) for x in os.getloadavg()]}
    started = time.monotonic()
    ui = _start_ui(store, free_port())
    browser: Chromium | None = None
    server_pid = None
    try:
        lines, urls = _read_urls(ui, timeout_s)
        t_urls = time.monotonic() - started
        server_pid = _server_pid(lines)
        browser = Chromium.start(chromium, workdir)
        browser.call("Target.getTargets")  # the browser answers: it has started
        t_browser = time.monotonic() - started
        pages = {}
        for name, url, want in (("runs", urls["runs of the study"], expected.runs()),
                                ("registry", urls["registered model"], expected.registry())):
            session = browser.open_tab(url)
            left = timeout_s - (time.monotonic() - started)
            text = browser.wait_for_text(session, want, max(left, 1.0))
            pages[name] = {"url": url, "rendered_s": round(time.monotonic() - started, 2),
                           "expected": list(want), "text_chars": len(text)}
            if shots is not None:
                shots.mkdir(parents=True, exist_ok=True)
                pages[name]["screenshot"] = str(
                    browser.screenshot(session, shots / f"ui-open-{name}.png"))
        total = max(p["rendered_s"] for p in pages.values())
        result["cpu_s"] = {"ui_tree": tree_cpu_s(ui.pid),
                           "chromium_tree": tree_cpu_s(browser.proc.pid)}
        result["seconds"] = {"urls_printed": round(t_urls, 2),
                             "browser_started": round(t_browser, 2),
                             "runs_page": pages["runs"]["rendered_s"],
                             "registry_page": pages["registry"]["rendered_s"],
                             "total": total}
        result["pages"] = pages
        result["ui_output"] = lines
        result["server_pid"] = server_pid
    finally:
        if browser is not None:
            browser.stop()
        out = _stop_ui(ui, server_pid)
    result["ui_exit"] = ui.returncode
    result["ui_stopped_line"] = "MLflow UI stopped" in out
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", type=Path, help="an MLflow store (mlflow.db); default: a "
                    "small one written first, as tests/test_ui.py's")
    ap.add_argument("--expect-run", default=Expected.run)
    ap.add_argument("--model", default=Expected.model)
    ap.add_argument("--alias", default=Expected.alias)
    ap.add_argument("--shots", type=Path, help="save the two pages as PNGs in this folder")
    ap.add_argument("--timeout", type=float, default=180.0)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    chromium = find_chromium()
    if chromium is None:
        sys.exit("headless Chromium not installed (Debian: apt-get install -y chromium)")
    tmp = Path(tempfile.mkdtemp(prefix="fedct-ui-open-"))
    try:
        store = args.store
        if store is None:
            sys.path.insert(0, str(ROOT))
            from tests.mlflow_store import write_study_store

            (tmp / "study").mkdir()
            store = write_study_store(tmp / "study")
        result = {"cpu_model": cpu_model(), "cpus": os.cpu_count(),
                  "mlflow": version("mlflow"),
                  "chromium_version": subprocess.run(
                      [chromium, "--version"], capture_output=True, text=True,
                      check=False).stdout.strip(),
                  "target_s": TARGET_S}
        result.update(open_ui(store.resolve(), chromium, tmp / "browser",
                              Expected(args.expect_run, args.model, args.alias),
                              args.shots, args.timeout))
        result["met_target"] = result["seconds"]["total"] <= TARGET_S
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
