"""Security review, as tests: nothing unpickles or runs remote code, uploads are size-limited, and no path a
dataset row or a link names can reach files outside the configured data roots."""

from __future__ import annotations

import ast
import os
import re
import tomllib
from pathlib import Path

import pytest

from tests.conftest import ROOT
from vlcore.data.example import MAX_IMAGE_BYTES, open_image, open_image_bytes
from vlcore.data.paths import check_local_file, is_allowed
from vlcore.data.sources import check_location, resolve_example
from vlcore.errors import DatasetError, InputError

SCANNED = ["vlcore", "pages", "streamlit_app.py", "scripts", "bench"]


def source_files() -> list[Path]:
    files = []
    for name in SCANNED:
        path = ROOT / name
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    assert len(files) > 30
    return files


def code_lines() -> list[tuple[str, int, str]]:
    """``(file, line number, line)`` of every non-comment line of the scanned code."""
    out = []
    for path in source_files():
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.lstrip().startswith("#"):
                out.append((str(path.relative_to(ROOT)), n, line))
    return out


# -- nothing unpickles, nothing runs remote or dynamic code ----------------------------------------------
FORBIDDEN = {
    "pickle / joblib / dill": re.compile(r"\b(import\s+(c?pickle|joblib|dill|shelve)|(c?pickle|joblib|dill|shelve)\.\w+|read_pickle)"),
    "numpy load with pickles": re.compile(r"allow_pickle\s*=\s*True"),
    "remote code": re.compile(r"trust_remote_code\s*[=:]\s*True|[\"']trust_remote_code[\"']\s*:\s*True"),
    "eval / exec": re.compile(r"(?<![\w.])(eval|exec)\s*\("),
    "unsafe yaml": re.compile(r"yaml\.(unsafe_)?load\((?![^)]*SafeLoader)"),
    "shell commands": re.compile(r"shell\s*=\s*True|os\.system\("),
}


@pytest.mark.parametrize("what", list(FORBIDDEN))
def test_no_unpickling_or_dynamic_code(what):
    hits = [f"{f}:{n}: {line.strip()}" for f, n, line in code_lines() if FORBIDDEN[what].search(line)]
    assert hits == [], f"{what}: {hits}"


def test_torch_load_only_with_weights_only():
    hits = []
    for path in source_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and _dotted(node.func) in ("torch.load", "load") and _is_torch_load(node):
                keywords = {k.arg: k.value for k in node.keywords}
                value = keywords.get("weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    hits.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert hits == []


def _dotted(func: ast.AST) -> str:
    if isinstance(func, ast.Attribute):
        return f"{_dotted(func.value)}.{func.attr}"
    return func.id if isinstance(func, ast.Name) else ""


def _is_torch_load(node: ast.Call) -> bool:
    return _dotted(node.func) == "torch.load"


def test_from_pretrained_never_trusts_remote_code():
    calls = 0
    for path in source_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "from_pretrained":
                calls += 1
                for kw in node.keywords:
                    assert not (kw.arg == "trust_remote_code" and not (isinstance(kw.value, ast.Constant)
                                                                       and kw.value.value is False)), path
    assert calls >= 4


def test_model_loading_passes_trust_remote_code_false(monkeypatch):
    import transformers

    from vlcore.models.registry import load_adapter

    seen = []
    for cls in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.ViltImageProcessorPil,
                transformers.ViltForQuestionAnswering):
        real = cls.from_pretrained

        def spy(*args, _real=real, _name=cls.__name__, **kwargs):
            seen.append((_name, kwargs.get("trust_remote_code")))
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    load_adapter("demo", device="cpu")
    assert {name for name, _ in seen} == {"AutoConfig", "AutoTokenizer", "ViltImageProcessorPil",
                                          "ViltForQuestionAnswering"}
    assert all(flag is False for _, flag in seen), seen


# -- uploads are size-limited -------------------------------------------------------------------------
def test_uploads_are_limited_to_50_mb_by_streamlit_and_by_the_code():
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["server"]["maxUploadSize"] <= 50
    assert MAX_IMAGE_BYTES == 50 * 1024**2
    with pytest.raises(InputError, match="images over 50 MB are refused"):
        open_image_bytes(b"\x89PNG" + b"\x00" * MAX_IMAGE_BYTES, "big.png")


# -- links and dataset rows cannot leave the data roots ------------------------------------------------------
def outside_paths(tmp_path: Path) -> list[str]:
    return [
        "/etc/passwd",
        "../../etc/passwd",
        str(tmp_path / ".." / ".." / "etc" / "passwd"),
        f"{tmp_path}/sub/../../../../../../etc/passwd",
        "~/.bashrc",
        "~root/.ssh/id_rsa",
        "~no-such-user-xyz/secret",
        "/proc/self/environ",
        "bad\x00name.png",
    ]


def test_paths_outside_the_roots_are_refused_whatever_their_spelling(tmp_path):
    for path in outside_paths(tmp_path):
        assert not is_allowed(path), path
        with pytest.raises(InputError, match="outside the folders VLScope may read"):
            check_local_file(path)
        with pytest.raises(InputError):
            open_image(path)
        with pytest.raises(DatasetError, match="VLSCOPE_DATA_ROOTS"):
            check_location(path)


def test_symlinks_out_of_a_root_are_refused(tmp_path):
    (tmp_path / "data").mkdir()
    os.symlink("/etc", tmp_path / "data" / "etc-link")  # a folder link
    os.symlink("/etc/hostname", tmp_path / "data" / "host.png")  # a file link
    os.symlink(tmp_path / "data" / "loop", tmp_path / "data" / "loop")  # a loop
    for name in ("etc-link/passwd", "host.png", "loop"):
        assert not is_allowed(tmp_path / "data" / name), name
        with pytest.raises((InputError, DatasetError)):
            check_location(str(tmp_path / "data" / name))
    inside = tmp_path / "data" / "real.txt"
    inside.write_text("x")
    os.symlink(inside, tmp_path / "data" / "alias.txt")  # a link that stays inside is fine
    assert is_allowed(tmp_path / "data" / "alias.txt")


@pytest.mark.parametrize("example_id", [
    "upload/../../../etc/passwd", "upload/..%2F..%2Fetc%2Fpasswd", "upload/", "upload/ABCDEF0123456789",
    "upload/0123456789abcdef/../../x",
])
def test_upload_ids_cannot_name_files(example_id):
    with pytest.raises(DatasetError):
        resolve_example(example_id)


def test_links_with_outside_paths_get_one_message_on_the_pages():
    from tests.app.conftest import open_page

    at = open_page("pages/2_Run_Model.py", {"ex": "upload/../../../etc/passwd"})
    assert not at.exception and len(at.error) == 1
    for loc in ("~/.ssh", "/etc", "../../etc/passwd"):
        at = open_page("pages/1_Dataset_Browser.py", {"ds": "vqa", "loc": loc, "split": "train"})
        assert not at.exception and len(at.error) == 1 and "not under a configured data folder" in at.error[0].value


def test_a_refused_location_does_not_reveal_the_servers_folders(tmp_path, monkeypatch):
    from vlcore.data.paths import data_roots
    from vlcore.data.sources import check_location
    from vlcore.errors import DatasetError

    monkeypatch.setenv("VLSCOPE_DATA_ROOTS", str(tmp_path / "private-datasets"))
    with pytest.raises(DatasetError) as err:
        check_location("/etc")
    assert "VLSCOPE_DATA_ROOTS" in str(err.value)
    for root in data_roots():
        assert str(root) not in str(err.value)


def test_dataset_text_is_escaped_before_it_is_rendered_as_html():
    from vlcore.data.browse import highlight_mentions

    html = highlight_mentions("<img src=x onerror=alert(1)> and <script>alert(2)</script>", [])
    assert "<script>" not in html and "<img" not in html and "&lt;script&gt;" in html
