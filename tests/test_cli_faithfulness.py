"""``python -m vlcore faithfulness``: the table on the demo model, one-line errors on bad arguments."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from tests.conftest import DEMO_DIR, ROOT
from vlcore.cli import main
from vlcore.attribution.faithfulness import METHODS


def test_faithfulness_on_the_demo_model_prints_the_table(tmp_path, capsys):
    out, details = tmp_path / "table.csv", tmp_path / "rows.csv"
    code = main(["faithfulness", "--model", str(DEMO_DIR), "--limit", "3",
                 "--n-random", "2", "--out", str(out), "--details", str(details)])
    assert code == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert "first 3 examples" in lines[0]
    assert lines[1].split()[:3] == ["method", "n", "pointing_accuracy"]
    assert [line.split()[0] for line in lines[2:]] == list(METHODS)
    assert "faithfulness 3/3" in captured.err  # progress goes to stderr
    table = pd.read_csv(out)
    assert table["method"].tolist() == list(METHODS) and (table["n"] == 3).all()
    assert table[["pointing_accuracy", "pointing_chance"]].stack().between(0, 1).all()
    assert (table["auc_positive"] <= 0.9 + 1e-9).all()  # probabilities over fractions 0 … 0.9
    rows = pd.read_csv(details)
    assert len(rows) == 9 and rows["example_id"].iloc[0] == "easy_vqa/test/0"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["faithfulness", "--limit", "0"], "positive integer"),
        (["faithfulness", "--limit", "many"], "positive integer"),
        (["faithfulness", "--min-overlap", "2"], "in [0, 1]"),
        (["faithfulness", "--split", "valid"], "invalid choice"),
        (["faithfulness", "--model", "./missing-dir", "--limit", "1"], "does not exist"),
        (["faithfulness", "--limit", "1", "--out", "no/such/folder/t.csv"], "does not exist"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(argv, message, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vlcore", *argv], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], proc.stderr
