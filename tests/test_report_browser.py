"""The report in a real browser: headless Chromium (Debian's ``chromium`` package) opens
it and every figure decodes and every table has rows.

The check runs as a small script appended to a copy of the report (the report itself has
no script); it writes its findings into the DOM, which ``--dump-dom`` prints. In CI
(``CI=true``) a missing Chromium is a failure, elsewhere a skip.
"""

from __future__ import annotations

import html
import json
import os
import re
import signal
import struct
import subprocess
from pathlib import Path

import pytest

from fedct.report.build import build_report, write_report
from tests.browser import chromium_or_skip
from tests.report.fakes import write_outputs
from tests.report.parse import SECTION_IDS, parse

CHECK = """<script>
addEventListener("load", () => {
  const box = e => e.getBoundingClientRect();
  const images = [...document.images].map(i => ({
    alt: i.alt, complete: i.complete, width: i.naturalWidth, height: i.naturalHeight,
    shown: box(i).width > 0 && box(i).height > 0}));
  const tables = [...document.querySelectorAll("table")].map(t => ({
    rows: [...t.tBodies].reduce((n, b) => n + b.rows.length, 0), shown: box(t).height > 0}));
  const sections = [...document.querySelectorAll("section")].map(s => s.id);
  const out = document.createElement("pre");
  out.id = "fedct-check";
  out.textContent = JSON.stringify({images, tables, sections});
  document.body.appendChild(out);
});
</script>"""


def _chromium() -> str:
    return chromium_or_skip()


# No network: every request that is not to this machine goes to a closed port, as on a
# hospital network that blocks CDNs (file:// pages load as usual).
OFFLINE = ("--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>")


def _dump_dom(exe: str, page: Path, workdir: Path, timeout: float = 90,
              extra: tuple[str, ...] = ()) -> str:
    """Chromium's DOM of ``page`` after load; every process it started is stopped."""
    cmd = [exe, *extra, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-crash-reporter", "--disable-breakpad", "--disable-extensions",
           f"--user-data-dir={workdir / 'profile'}", "--virtual-time-budget=5000",
           "--dump-dom", page.as_uri()]
    env = {**os.environ, "HOME": str(workdir)}
    # Its own process group (id = its PID), so renderer and helper processes go with it.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            start_new_session=True, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"chromium did not finish within {timeout} s")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    assert proc.returncode == 0, err[-2000:]
    return out


def _png_size(png: bytes) -> tuple[int, int]:
    return struct.unpack(">II", png[16:24])  # IHDR width, height


def test_every_figure_and_table_renders_in_chromium(tmp_path: Path) -> None:
    exe = _chromium()
    report = build_report(write_outputs(tmp_path / "outputs"))
    assert report.missing == ()
    path = write_report(report, tmp_path / "report.html")
    static = parse(path.read_text())
    pngs = [png for s in static.sections.values() for png in s.images]
    n_tables = sum(len(s.table_rows) for s in static.sections.values())
    probe = tmp_path / "probe.html"
    probe.write_text(path.read_text().replace("</body>", CHECK + "</body>"))

    dom = _dump_dom(exe, probe, tmp_path)

    m = re.search(r'<pre id="fedct-check">(.*?)</pre>', dom, re.S)
    assert m, "the check did not run: " + dom[-500:]
    found = json.loads(html.unescape(m.group(1)))
    assert found["sections"] == list(SECTION_IDS)
    assert len(found["images"]) == len(pngs) >= 7
    for img, png in zip(found["images"], pngs, strict=True):
        assert img["complete"] and img["shown"], img
        # Decoded by the browser at the PNG's own size.
        assert (img["width"], img["height"]) == _png_size(png), img
    assert len(found["tables"]) == n_tables >= 10
    assert all(t["rows"] > 0 and t["shown"] for t in found["tables"]), found["tables"]
