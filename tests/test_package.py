"""The installable package: pyproject's dependencies and packages, the ``vlscope`` command, the app files, and a
``pip install .`` into a fresh virtualenv (marked slow: it installs torch and the rest, minutes)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirement_lines(path: Path) -> list[str]:
    """The requirement lines of a requirements file (no comments, no ``-r``)."""
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("-")]


def test_dependencies_are_requirements_txt_less_the_optional_ones():
    reqs = requirement_lines(ROOT / "requirements.txt")
    extras = PYPROJECT["project"]["optional-dependencies"]
    optional = set(extras["umap"] + extras["postgres"])
    assert optional <= set(reqs)  # Streamlit Community Cloud installs requirements.txt: UMAP and Postgres too
    assert PYPROJECT["project"]["dependencies"] == [r for r in reqs if r not in optional]
    assert "torch==2.13.0" in reqs
    dev = requirement_lines(ROOT / "requirements-dev.txt")
    assert set(extras["dev"]) <= set(dev)
    assert {"nbclient==0.11.0", "nbformat==5.11.1", "ipykernel==7.4.0"} <= set(extras["dev"])
    assert extras["ray"] == ["ray[data]==2.60.0"]


def test_every_vlcore_package_is_shipped_and_nothing_else_of_the_repo():
    packages = set(PYPROJECT["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "vlcore").rglob("__init__.py")}
    assert on_disk <= packages, f"add {sorted(on_disk - packages)} to [tool.setuptools] packages in pyproject.toml"
    assert {p.split(".")[0] for p in packages} == {"vlcore", "vlscope_app"}
    assert PYPROJECT["tool"]["setuptools"]["package-dir"] == {"vlscope_app": "."}
    shipped = PYPROJECT["tool"]["setuptools"]["package-data"]["vlscope_app"]
    assert not any("secrets" in pattern for pattern in shipped)
    for pattern in shipped:  # every pattern names files that exist
        assert list(ROOT.glob(pattern)), pattern


def test_console_help_lists_the_app_and_every_cli_command(capsys):
    from vlcore.cli import build_parser
    from vlcore.console import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    sub = re.search(r"\{(.*)\}", build_parser().format_usage()).group(1).split(",")
    assert out.startswith("usage: vlscope {app,") and all(f"\n  {name} " in out for name in ["app", *sub])
    assert main([]) == 2 and "usage: vlscope" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    assert main(["--version"]) == 0 and capsys.readouterr().out.startswith("vlscope 0.1.0")


def test_console_runs_the_cli_commands(tmp_path, capsys):
    from vlcore.console import main

    with pytest.raises(SystemExit) as done:
        main(["trace", "--help"])
    assert done.value.code == 0 and "--image" in capsys.readouterr().out
    missing = tmp_path / "missing.png"
    assert main(["trace", "--image", str(missing), "--text", "what?", "--out", str(tmp_path / "t.safetensors")]) == 2
    assert "image file not found" in capsys.readouterr().err


def test_app_command_runs_the_main_script_with_the_apps_settings(capsys):
    from vlcore.app_files import APP_ROOT, DEMO_MODEL_DIR
    from vlcore.console import app_command, main

    command = app_command(["--server.port=8600"])
    assert command[:5] == [sys.executable, "-m", "streamlit", "run", str(ROOT / "streamlit_app.py")]
    assert "--server.maxUploadSize=50" in command and "--client.toolbarMode=viewer" in command
    assert command[-1] == "--server.port=8600"  # the user's options come last and win
    assert APP_ROOT == ROOT and DEMO_MODEL_DIR == ROOT / "sample_data" / "models" / "vilt-tiny-easyvqa"
    assert main(["app", "--help"]) == 0 and "streamlit_app.py" in capsys.readouterr().out


def test_an_installed_vlcore_finds_the_app_files_in_vlscope_app(tmp_path, monkeypatch):
    import vlcore
    from vlcore import app_files

    site = tmp_path / "site-packages"
    (site / "vlcore").mkdir(parents=True)
    (site / "vlscope_app").mkdir()
    (site / "vlscope_app" / "streamlit_app.py").write_text("")
    monkeypatch.setattr(vlcore, "__file__", str(site / "vlcore" / "__init__.py"))
    monkeypatch.syspath_prepend(str(site))
    assert app_files.app_root() == (site / "vlscope_app").resolve()
    (site / "vlscope_app" / "streamlit_app.py").unlink()  # neither holds the app: the checkout's root, as before
    assert app_files.app_root() == site.resolve()


# ---------------------------------------------------------------------------------------
# pip install . into a fresh virtualenv
# ---------------------------------------------------------------------------------------

NETWORK_ERRORS = ("Failed to establish a new connection", "Temporary failure in name resolution",
                  "Network is unreachable", "ProxyError", "Could not fetch URL")

APP_CHECK = """
import json, sys
from streamlit.testing.v1 import AppTest
from vlcore.app_files import APP_ROOT
from vlcore.models.registry import DEMO_MODEL_DIR
at = AppTest.from_file(str(APP_ROOT / "streamlit_app.py"), default_timeout=600).run()
home = ([str(e.value) for e in at.exception], [e.value for e in at.error], len(at.get("vega_lite_chart")))
at.switch_page("pages/4_Attention_Heatmaps.py")
at.query_params["ex"] = "easy_vqa/test/0"
at.run()
heat = ([str(e.value) for e in at.exception], [e.value for e in at.error], len(at.get("vega_lite_chart")))
print(json.dumps({"root": str(APP_ROOT), "demo": DEMO_MODEL_DIR.is_dir(), "home": home, "heatmaps": heat}))
"""


def source_copy(dest: Path) -> Path:
    """The checkout's files (tracked, and new files git does not ignore) in ``dest``, plus a secrets file that
    must not be shipped."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    (dest / ".streamlit" / "secrets.toml").write_text('password = "never shipped"\n')
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory):
    """``python -m venv`` (no system site-packages) and ``pip install .`` of a copy of the checkout in it.

    pip resolves the dependencies with the machine's own configuration (its indexes, its wheel cache).
    """
    if shutil.which("git") is None:
        pytest.skip("git is needed to list the checkout's files")
    base = tmp_path_factory.mktemp("fresh")
    src = source_copy(base / "src")
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    start = time.monotonic()
    done = subprocess.run([str(python), "-m", "pip", "install", str(src)], capture_output=True, text=True, check=False)
    seconds = time.monotonic() - start
    if done.returncode and any(marker in done.stdout + done.stderr for marker in NETWORK_ERRORS):
        pytest.skip(f"pip could not reach a package index: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    print(f"pip install . into a fresh venv: {seconds:.0f} s")
    return venv


@pytest.mark.slow
def test_fresh_venv_installs_the_package_the_command_and_the_app_files(fresh_venv, tmp_path):
    bindir = fresh_venv / "bin"
    env = {**os.environ, "VLSCOPE_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    help_run = subprocess.run([str(bindir / "vlscope"), "--help"], capture_output=True, text=True, cwd=tmp_path, env=env,
                              check=False)
    assert help_run.returncode == 0 and "extract" in help_run.stdout and "app" in help_run.stdout, help_run.stderr
    imported = subprocess.run([str(bindir / "python"), "-c", "import vlcore.notebook, vlcore; print(vlcore.__file__)"],
                              capture_output=True, text=True, cwd=tmp_path, env=env, check=False)
    assert imported.returncode == 0, imported.stderr
    assert str(fresh_venv) in imported.stdout  # the installed copy, not the checkout

    record = next(fresh_venv.glob("lib/python*/site-packages/vlscope-*.dist-info/RECORD")).read_text()
    paths = [line.split(",")[0] for line in record.splitlines()]
    assert {p.split("/")[0] for p in paths if not p.startswith("..")} == {
        "vlcore", "vlscope_app", next(p.split("/")[0] for p in paths if ".dist-info/" in p)}
    for wanted in ("vlscope_app/streamlit_app.py", "vlscope_app/pages/4_Attention_Heatmaps.py",
                   "vlscope_app/sample_data/models/vilt-tiny-easyvqa/model.safetensors",
                   "vlscope_app/.streamlit/config.toml", "vlcore/notebook.py", "vlcore/models/vilt.py"):
        assert wanted in paths, wanted
    assert not any("secrets.toml" in p or p.startswith(("tests/", "bench/", "scripts/")) for p in paths)

    app = subprocess.run([str(bindir / "python"), "-c", APP_CHECK], capture_output=True, text=True, cwd=tmp_path,
                         env=env, timeout=900, check=False)
    assert app.returncode == 0, app.stderr[-3000:]
    shown = json.loads(app.stdout.strip().splitlines()[-1])
    assert shown["root"].startswith(str(fresh_venv)) and shown["demo"]
    assert shown["home"][:2] == [[], []] and shown["home"][2] >= 2  # the demo's answer and its attention
    assert shown["heatmaps"][:2] == [[], []] and shown["heatmaps"][2] >= 3


@pytest.mark.slow
def test_vlscope_app_serves_the_installed_app(fresh_venv, tmp_path):
    port = free_port()
    env = {**os.environ, "VLSCOPE_CACHE": str(tmp_path / "cache"), "PYTHONPATH": ""}
    server = subprocess.Popen([str(fresh_venv / "bin" / "vlscope"), "app", "--server.headless=true",
                               f"--server.port={port}", "--server.address=127.0.0.1"], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, health = time.monotonic() + 120, None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as response:
                    health = response.read().decode()
                break
            except OSError:
                time.sleep(0.5)
        assert health == "ok", server.stdout.read() if server.poll() is not None else "no answer in 120 s"
    finally:
        server.send_signal(signal.SIGTERM)  # vlscope became the Streamlit server: this stops it
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    assert server.returncode is not None
