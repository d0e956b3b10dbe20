"""Fixtures of the real-browser test: a `streamlit run` server on a free port and headless Debian Chromium.

Playwright drives the system Chromium (``/usr/bin/chromium``, Debian's ``chromium`` package); Playwright's own
browser download is never used. Without the browser or the ``playwright`` package the tests skip with the reason.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("VLSCOPE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--disable-quic", "--no-first-run", "--disable-dev-shm-usage",
]
SERVER_START_S = 120  # streamlit imports torch on first use; a loaded 2-core machine is slow


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=5) as resp:
            return resp.status == 200 and resp.read().strip() == b"ok"
    except OSError:
        return False


@pytest.fixture(scope="module")
def artifacts_dir(tmp_path_factory) -> Path:
    """Where the step screenshots go: ``$VLSCOPE_E2E_ARTIFACTS`` (CI keeps it), else a pytest temp dir."""
    wanted = os.environ.get("VLSCOPE_E2E_ARTIFACTS")
    path = Path(wanted) if wanted else tmp_path_factory.mktemp("e2e-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def app_url(tmp_path_factory, artifacts_dir):
    """``streamlit run streamlit_app.py`` on 127.0.0.1 and a free port with the bundled default, its own cache
    dir and no network; yields its base URL and stops it on teardown. Its log is kept beside the screenshots."""
    port = free_port()
    cache = tmp_path_factory.mktemp("e2e-cache")
    env = {**os.environ, "VLSCOPE_CACHE": str(cache), "VLSCOPE_DATA_ROOTS": str(cache), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "streamlit", "run", "streamlit_app.py", "--server.headless", "true",
           "--server.address", "127.0.0.1", "--server.port", str(port), "--browser.gatherUsageStats", "false",
           "--server.fileWatcherType", "none", "--server.runOnSave", "false"]
    log_path = artifacts_dir / "streamlit.log"
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + SERVER_START_S
            while not _healthy(url):
                if proc.poll() is not None:
                    pytest.fail(f"streamlit exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
                if time.monotonic() > deadline:
                    pytest.fail(f"streamlit not healthy after {SERVER_START_S} s:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.25)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)


@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium under Playwright, or a skip saying what is missing."""
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's `chromium` package (apt-get install chromium) "
                    "or set VLSCOPE_CHROMIUM; .ci/run installs it")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: "
                                   "pip install -r requirements-dev.txt")
    with sync_api.sync_playwright() as pw:  # launch() gives Chromium a fresh temporary profile (user-data-dir)
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: drives the app in headless Chromium (deselect with -m 'not e2e')")
