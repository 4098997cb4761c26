"""Headless Chromium for the browser tests: its path, or a skip (a failure where CI=true)."""

from __future__ import annotations

import os
import shutil

import pytest


def chromium_or_skip(exe: str | None = None) -> str:
    """``exe`` (default: Debian's ``chromium`` on PATH), or skip: CI must run browser tests."""
    exe = exe or shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        reason = "headless Chromium not installed (Debian: apt-get install -y chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI must run the browser test")
        pytest.skip(reason)
    return exe
