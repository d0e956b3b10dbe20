"""``python -m vlcore``: sweeps on the bundled sample, single traces, clear one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from tests.conftest import ROOT, grey_image
from vlcore.cli import main
from vlcore.storage.sweeps import PREDICTION_COLUMNS
from vlcore.storage.sweeps import SUMMARY_COLUMNS
from vlcore.storage.store import trace_from_bytes


def test_extract_on_the_bundled_sample_writes_expected_parquet(tmp_path, capsys):
    assert main(["extract", "--model", "demo", "--dataset", "easy_vqa", "--split", "test",
                 "--limit", "12", "--batch-size", "5", "--out", str(tmp_path / "sw")]) == 0
    preds = pd.read_parquet(tmp_path / "sw" / "predictions.parquet")
    heads = pd.read_parquet(tmp_path / "sw" / "head_stats.parquet")
    assert list(preds.columns) == PREDICTION_COLUMNS and len(preds) == 12
    assert list(heads.columns) == SUMMARY_COLUMNS
    assert preds["example_id"].iloc[0] == "easy_vqa/test/0" and preds["gold"].iloc[0].tolist() == ["triangle"]
    assert "wrote 12 examples" in capsys.readouterr().out


def test_trace_command_writes_a_loadable_trace(tmp_path):
    img = tmp_path / "img.png"
    grey_image(64, 64, red_cell=(2, 3)).save(img)
    out = tmp_path / "t.safetensors"
    assert main(["trace", "--model", "demo", "--image", str(img), "--text", "what color is the shape?", "--out", str(out)]) == 0
    trace = trace_from_bytes(out.read_bytes())
    assert trace.grid == (8, 8) and trace.text == "what color is the shape?" and trace.attentions is not None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["extract", "--limit", "0", "--out", "x"], "positive integer"),
        (["extract", "--dataset", "nope", "--out", "x"], "unknown dataset"),
        (["extract", "--model", "./missing-dir", "--limit", "1", "--out", "x"], "does not exist"),
        (["trace", "--image", "missing.png", "--text", "hi", "--out", "x"], "image file not found"),
        (["bogus"], "invalid choice"),
    ],
)
def test_bad_arguments_give_one_line_and_nonzero_exit(argv, message, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vlcore", *argv], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_extract_probe_flag_writes_the_probe_data_the_probing_page_reads(tmp_path):
    from vlcore.storage.sweeps import load_sweep_probe

    out = tmp_path / "probe"
    assert main(["extract", "--limit", "6", "--batch-size", "3", "--probe", "--out", str(out)]) == 0
    probe = load_sweep_probe(out)
    assert probe is not None and sorted(set(probe["example_ids"])) == [f"easy_vqa/test/{i}" for i in range(6)]
    assert load_sweep_probe(tmp_path) is None  # no probe file, no probe data
    assert main(["extract", "--limit", "6", "--out", str(tmp_path / "plain")]) == 0
    assert load_sweep_probe(tmp_path / "plain") is None  # a plain sweep stores none
