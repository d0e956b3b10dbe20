"""Sweeps on Ray Data (`vlcore.run.ray_sweep`): the in-process sweep's results, resume, retries, a URL target, no ray.

One local Ray (``ray.init(num_cpus=2)``) serves the module; the bundled demo model sweeps 16 easy-VQA questions.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import ROOT
from vlcore.cli import main
from vlcore.data.easy_vqa import easy_vqa_examples
from vlcore.models.registry import load_adapter
from vlcore.run.sweep import run_sweep
from vlcore.storage.sweeps import load_sweep, load_sweep_vectors

N, BATCH = 16, 4
DATASET = "easy_vqa/test"


class RecordIds:
    """Batch hook: appends every batch's ids to a file (which examples the workers computed)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __call__(self, ids: list[str]) -> None:
        with open(self.path, "a") as fh:
            fh.write("".join(f"{i}\n" for i in ids))


class Refuse:
    """Batch hook: raises a user-facing error on the batch holding ``example_id`` (a bad image would, too)."""

    def __init__(self, example_id: str) -> None:
        self.example_id = example_id

    def __call__(self, ids: list[str]) -> None:
        if self.example_id in ids:
            from vlcore.errors import InputError

            raise InputError(f"planted: example {self.example_id} cannot be read")


class DieOnce:
    """Batch hook: the worker process exits (as if killed) on the batch holding ``example_id``, the first time."""

    def __init__(self, example_id: str, marker: Path) -> None:
        self.example_id, self.marker = example_id, str(marker)

    def __call__(self, ids: list[str]) -> None:
        if self.example_id in ids and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)


@pytest.fixture(scope="module")
def local_ray():
    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the hooks travel whole to the workers
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), saved) if p)  # the workers import vlcore
    ray.init(address="local", num_cpus=2, include_dashboard=False)  # a new Ray, never one already running here
    yield ray
    ray.shutdown()
    if saved is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = saved


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The in-process sweep of the same examples and batch size."""
    out = tmp_path_factory.mktemp("in-process") / "sweep"
    run_sweep(load_adapter("demo"), easy_vqa_examples("test", N), out, dataset=DATASET, batch_size=BATCH)
    return out


@pytest.fixture(scope="module")
def cli_sweep(local_ray, tmp_path_factory) -> tuple[Path, int, str, str]:
    """``python -m vlcore extract ... --engine ray --workers 2``: (folder, exit code, stdout, stderr)."""
    out = tmp_path_factory.mktemp("ray") / "sweep"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["extract", "--model", "demo", "--dataset", "easy_vqa", "--split", "test", "--limit", str(N),
                     "--batch-size", str(BATCH), "--out", str(out), "--engine", "ray", "--workers", "2"])
    return out, code, stdout.getvalue(), stderr.getvalue()


def assert_same_sweep(got: Path, want: Path) -> None:
    """Same examples in the same order, once each; predictions and head statistics within float16 tolerance."""
    (gp, gh), (wp, wh) = load_sweep(got), load_sweep(want)
    assert gp["example_id"].tolist() == wp["example_id"].tolist() and gp["example_id"].is_unique
    for frame in (gp, wp):
        frame["gold"] = frame["gold"].map(tuple)
    same = ["example_id", "question", "gold", "category", "prediction", "correct", "text_truncated", "n_text_tokens",
            "n_image_tokens"]
    pd.testing.assert_frame_equal(gp[same], wp[same])
    np.testing.assert_allclose(gp["probability"], wp["probability"], rtol=1e-3, atol=1e-5)
    for g, w in zip(gp["top_k"], wp["top_k"]):
        (g_labels, g_probs), (w_labels, w_probs) = zip(*json.loads(g)), zip(*json.loads(w))
        assert g_labels == w_labels
        np.testing.assert_allclose(g_probs, w_probs, rtol=1e-3, atol=1e-5)
    assert len(gh) == len(wh) and not gh.duplicated(["example_id", "layer", "head", "metric"]).any()
    pd.testing.assert_frame_equal(gh, wh, rtol=1e-3, atol=1e-5)
    gv, wv = load_sweep_vectors(got), load_sweep_vectors(want)
    assert gv["example_ids"] == wv["example_ids"] and gv["text"] == wv["text"]
    for name in ("example", "token", "modality", "special", "patch_rc", "thumbs"):
        np.testing.assert_array_equal(gv[name], wv[name])
    np.testing.assert_allclose(gv["vectors"].astype(np.float32), wv["vectors"].astype(np.float32), rtol=1e-2, atol=1e-2)


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def test_cli_ray_sweep_equals_the_in_process_sweep(cli_sweep, reference):
    out, code, stdout, stderr = cli_sweep
    assert code == 0, stderr
    assert_same_sweep(out, reference)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "head_stats.parquet", "manifest.json", "predictions.parquet", "vectors.safetensors"]  # merged, no parts left
    got, want = manifest(out), manifest(reference)
    assert got["key"] == want["key"] and got["complete"] and got["engine"] == "ray" and got["workers"] == 2
    assert f"ray sweep {N}/{N} (" in stderr and "ETA" in stderr  # progress
    summary = stdout.strip().splitlines()[-1]
    assert summary.startswith(f"ray sweep complete: {N} examples ({N} computed, 0 already done) in ")
    assert "examples/s on 2 workers, 0 retries" in summary


def test_the_statistics_page_reads_a_ray_sweep(cli_sweep):
    from tests.app.conftest import open_page
    from tests.app.test_stats_page import PAGE, head_charts, heat_rows
    from vlcore.storage.store import Store

    shutil.copytree(cli_sweep[0], Store().sweep_dir("ray" + "0" * 61))
    at = open_page(PAGE, {"scope": "sweep", "metric": "entropy"})
    assert not at.exception and not at.error
    assert {r["n"] for r in heat_rows(head_charts(at)[0])} == {N}


def test_a_rerun_computes_only_the_missing_examples(local_ray, reference, tmp_path):
    from vlcore.run.ray_examples import ray_input
    from vlcore.run.ray_sweep import run_ray_sweep

    out, seen = tmp_path / "sweep", tmp_path / "computed.txt"
    stops = iter(range(100))  # the in-process sweep stops after two batches: 8 of 16 done
    run_sweep(load_adapter("demo"), easy_vqa_examples("test", N), out, dataset=DATASET, batch_size=BATCH,
              should_stop=lambda: next(stops) >= 2)
    assert len(load_sweep(out)[0]) == 8 and not manifest(out)["complete"]
    report = run_ray_sweep("demo", ray_input("easy_vqa", "test", N), out, dataset=DATASET, batch_size=BATCH,
                           workers=1, batch_hook=RecordIds(seen))
    assert (report.skipped, report.new, report.complete) == (8, 8, True)
    assert sorted(seen.read_text().split()) == sorted(f"easy_vqa/test/{i}" for i in range(8, N))
    assert_same_sweep(out, reference)
    again = run_ray_sweep("demo", ray_input("easy_vqa", "test", N), out, dataset=DATASET, batch_size=BATCH,
                          workers=1, batch_hook=RecordIds(seen))
    assert (again.skipped, again.new, again.complete) == (N, 0, True)
    assert len(seen.read_text().split()) == 8  # nothing ran again


def test_a_killed_worker_is_retried_and_the_url_target_is_complete_without_duplicates(local_ray, reference, tmp_path):
    from vlcore.run.ray_examples import ray_input
    from vlcore.run.ray_sweep import run_ray_sweep

    remote, died = tmp_path / "bucket" / "sweep", tmp_path / "died"
    report = run_ray_sweep("demo", ray_input("easy_vqa", "test", N), remote.as_uri(), dataset=DATASET,
                           batch_size=BATCH, workers=1, batch_hook=DieOnce("easy_vqa/test/9", died))
    assert died.exists()  # the worker holding examples 8..11 was killed once
    assert report.complete and report.new == N and report.retries >= 1 and report.restarts >= 1
    assert f"{report.retries} retries, {report.restarts} worker restarts" in report.summary()
    assert_same_sweep(remote, reference)
    assert not list(remote.glob("part-*")) and not list(remote.glob(".*.tmp"))


def test_an_error_on_a_worker_reaches_the_driver_as_itself_and_the_finished_batches_stay(local_ray, tmp_path):
    from vlcore.errors import InputError
    from vlcore.run.ray_examples import ray_input
    from vlcore.run.ray_sweep import run_ray_sweep

    with pytest.raises(InputError, match="^planted: example easy_vqa/test/1 cannot be read$"):
        run_ray_sweep("demo", ray_input("easy_vqa", "test", 8), tmp_path / "sweep", dataset=DATASET,
                      batch_size=BATCH, workers=1, batch_hook=Refuse("easy_vqa/test/1"))
    assert not manifest(tmp_path / "sweep")["complete"]
    assert "easy_vqa/test/1" not in set(load_sweep(tmp_path / "sweep")[0]["example_id"])


def test_a_parquet_vqa_set_sweeps_on_ray_as_in_process(local_ray, tmp_path):
    import datasets
    from PIL import Image

    from vlcore.data.catalog import load_examples
    from vlcore.data.easy_vqa import load_easy_vqa
    from vlcore.run.ray_examples import ray_input
    from vlcore.run.ray_sweep import run_ray_sweep

    records = load_easy_vqa("test")[:6]

    def png(path: str) -> bytes:
        buf = io.BytesIO()
        Image.open(path).save(buf, format="PNG")
        return buf.getvalue()

    answer = {"answer": datasets.Value("string"), "answer_id": datasets.Value("int64")}
    text = datasets.Value("string")
    features = datasets.Features({"question": text, "multiple_choice_answer": text, "answers": datasets.List(answer),
                                  "image": datasets.Image()})
    datasets.Dataset.from_dict({
        "question": [r.question for r in records], "multiple_choice_answer": [r.answer for r in records],
        "answers": [[{"answer": r.answer, "answer_id": k} for k in range(3)] for r in records],
        "image": [{"bytes": png(r.image_path), "path": None} for r in records],
    }, features=features).to_parquet(tmp_path / "vqa.parquet")
    location = str(tmp_path / "vqa.parquet")
    examples = load_examples("vqa", "validation", location=location)
    source = ray_input("vqa", "validation", location=location)
    assert source.ids == [e.example_id for e in examples] == [f"vqa/validation/{i}" for i in range(6)]
    run_sweep(load_adapter("demo"), examples, tmp_path / "in-process", dataset="vqa/validation", batch_size=BATCH)
    report = run_ray_sweep("demo", source, tmp_path / "ray", dataset="vqa/validation", batch_size=BATCH, workers=1)
    assert report.complete and report.new == 6
    assert_same_sweep(tmp_path / "ray", tmp_path / "in-process")
    assert load_sweep(tmp_path / "ray")[0]["gold"].map(tuple).tolist() == [(r.answer,) for r in records]


def test_workers_map_rows_to_the_examples_the_in_process_loader_makes(tmp_path):
    """No Ray needed: the Arrow rows a worker gets become the same examples (ids, text, answers, pixels)."""
    import datasets
    from PIL import Image

    from vlcore.data.catalog import load_examples
    from vlcore.run.ray_examples import ray_input

    def png(value: int) -> dict:
        buf = io.BytesIO()
        Image.fromarray(np.full((40, 40, 3), value, np.uint8)).save(buf, format="PNG")
        return {"bytes": buf.getvalue(), "path": None}

    text = datasets.Value("string")
    datasets.Dataset.from_dict(
        {"caption": ["a red square", "a blue one", "green"], "label": ["red", "blue", "green"],
         "img": [png(v) for v in (0, 90, 180)]},
        features=datasets.Features({"caption": text, "label": text, "img": datasets.Image()}),
    ).save_to_disk(tmp_path / "set")
    want = load_examples("generic", "train", 2, location=str(tmp_path / "set"), offset=1)
    source = ray_input("generic", "train", 2, location=str(tmp_path / "set"), offset=1)
    got = source.mapper.examples(source.table.with_format("arrow")[:])  # what a worker does with its batch
    assert source.ids == [e.example_id for e in want] == ["generic/train/1", "generic/train/2"]
    for g, w in zip(got, want):
        assert (g.example_id, g.question, g.answers, g.category) == (w.example_id, w.question, w.answers, w.category)
        np.testing.assert_array_equal(np.asarray(g.load_image()), np.asarray(w.load_image()))
    assert [float(np.asarray(g.load_image()).mean()) for g in got] == [90.0, 180.0]


def test_without_ray_the_engine_says_how_to_install_it_in_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    code = main(["extract", "--limit", "2", "--out", str(tmp_path / "sw"), "--engine", "ray"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "pip install 'ray[data]==2.60.0'" in err[0] and "drop --engine ray" in err[0]
    assert not (tmp_path / "sw").exists()


@pytest.mark.parametrize("argv, message", [
    (["--workers", "2"], "--workers apply to --engine ray"),
    (["--out", "s3://bucket/sweep"], "use --engine ray for URLs"),
    (["--engine", "ray", "--gpus-per-worker", "-1"], "expected a number of GPUs >= 0"),
])
def test_ray_options_are_checked_in_one_line(argv, message, tmp_path, capsys):
    args = ["extract", "--limit", "2", "--out", str(tmp_path / "sw"), *argv]
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own checks
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
