"""``python -m vlcore trace`` and ``extract`` on every family's tiny checkpoint folder: a loadable trace with the
family's streams and blocks, a summary that lists them, zero-shot labels, accuracy only where answers compare, and
one-line errors for an unsupported folder or labels a model cannot take."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, grey_image
from tests.models.tiny_blip import TINY_CHECKPOINTS as BLIP
from tests.models.tiny_clip import TINY_CHECKPOINTS as CLIP
from vlcore.cli import main
from vlcore.storage.store import trace_from_bytes

BLOCKS = {  # name -> the blocks and streams the family's trace holds
    "blip-itm": ({"vision.self", "text.self", "text.cross"}, {"vision", "text"}),
    "blip-vqa": ({"vision.self", "text.self", "text.cross"}, {"vision", "text"}),
    "clip": ({"vision.self", "text.self"}, {"vision", "text"}),
    "siglip": ({"vision.self", "text.self", "vision.pool"}, {"vision", "text", "probe"}),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cli-families")
    return {name: str(write(root / name)) for name, write in {**BLIP, **CLIP}.items()}


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "shape.png"
    grey_image(48, 32, red_cell=(1, 2)).save(path)
    return path


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_trace_writes_the_familys_blocks_and_lists_them(folders, image, tmp_path, capsys, name):
    out = tmp_path / "t.safetensors"
    assert main(["trace", "--model", folders[name], "--image", str(image), "--text", "what color is the shape?",
                 "--out", str(out)]) == 0
    trace = trace_from_bytes(out.read_bytes())
    blocks, streams = BLOCKS[name]
    assert set(trace.blocks) == blocks and set(trace.streams) == streams
    assert trace.text == "what color is the shape?" and all(b.attentions is not None for b in trace.blocks.values())
    printed = capsys.readouterr().out
    for block_name, block in trace.blocks.items():
        layers, heads, q, k = block.attentions.shape
        assert f"block {block_name}: {block.query} -> {block.key}" in printed
        assert f"{layers} layers x {heads} heads, {q} x {k}" in printed
    for stream, layout in trace.streams.items():
        assert f"stream {stream}: {layout.n_tokens} tokens (" in printed
    assert re.search(r"vision: 1[67] tokens \(.*16 patch; 4x4 grid\)", printed)  # CLIP/BLIP: CLS + 16; SigLIP: 16
    viewed = [line for line in printed.splitlines() if line.endswith("(default view)")]
    assert len(viewed) == 1 and viewed[0].startswith(f"block {trace.view}: ")


def test_trace_with_labels_classifies_over_them(folders, image, tmp_path, capsys):
    out = tmp_path / "zs.safetensors"
    assert main(["trace", "--model", folders["clip"], "--image", str(image), "--text", "a photo", "--labels",
                 "red, blue ,circle", "--out", str(out)]) == 0
    trace = trace_from_bytes(out.read_bytes())
    assert {label for label, _ in trace.prediction} == {"red", "blue", "circle"}
    assert sum(p for _, p in trace.prediction) == pytest.approx(1.0, abs=1e-4)  # CLIP: a softmax over the labels
    assert trace.meta["task"] == "zero_shot" and "task zero_shot" in capsys.readouterr().out


@pytest.mark.parametrize("name, args, accuracy", [
    ("blip-itm", [], r"accuracy n/a: itm scores each image-text pair"),
    ("blip-vqa", [], r"accuracy \d\.\d{4}"),
    ("clip", [], r"accuracy n/a: similarity scores each image-text pair"),
    ("clip", ["--zero-shot"], r"accuracy \d\.\d{4}"),
])
def test_extract_sweeps_every_family_with_accuracy_only_where_answers_compare(folders, tmp_path, capsys, name, args,
                                                                              accuracy):
    from vlcore.storage.sweeps import load_sweep

    out = tmp_path / "sweep"
    assert main(["extract", "--model", folders[name], "--limit", "4", "--batch-size", "2", "--out", str(out),
                 *args]) == 0
    printed = capsys.readouterr().out
    preds, heads = load_sweep(out)
    assert len(preds) == 4 and len(heads) and re.search(accuracy, printed), printed
    for block in BLOCKS[name][0]:
        assert f"block {block}: " in printed
    if "--zero-shot" in args:  # over the easy-VQA answers of the 4 examples
        from vlcore.data.easy_vqa import easy_vqa_examples

        vocabulary = {a for e in easy_vqa_examples("test", limit=4) for a in e.answers}
        assert set(preds["prediction"]) <= vocabulary
        acc = preds["correct"].astype(float).mean()
        assert f"accuracy {acc:.4f}" in printed


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlcore", *args], capture_output=True, text=True, cwd=ROOT,
                          check=False, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_an_unsupported_folder_is_one_line_naming_the_supported_families(tmp_path, image):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path / "bert")
    for args in (["trace", "--image", str(image), "--text", "hi", "--out", str(tmp_path / "x.safetensors")],
                 ["extract", "--limit", "2", "--out", str(tmp_path / "sweep")]):
        done = run_cli(*args, "--model", str(tmp_path / "bert"))
        lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("Loading")]
        assert done.returncode == 2 and len(lines) == 1, done.stderr
        assert "Traceback" not in done.stderr and lines[0].startswith("vlcore: error: ")
        assert "is a 'bert' model (BertModel)" in lines[0]
        for family in ("ViLT (", "BLIP (", "CLIP / SigLIP ("):
            assert family in lines[0]
    assert not (tmp_path / "x.safetensors").exists()


def test_labels_for_a_model_without_zero_shot_are_one_line(tmp_path, image, capsys):
    assert main(["trace", "--model", "demo", "--image", str(image), "--text", "hi", "--labels", "a,b",
                 "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot classify over candidate labels" in err and "CLIP / SigLIP" in err
    assert main(["trace", "--model", "demo", "--image", str(image), "--text", "hi", "--labels", " , ",
                 "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "--labels needs comma-separated labels" in capsys.readouterr().err
