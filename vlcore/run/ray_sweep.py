"""Sweeps past one machine: the in-process sweep's batches, run by Ray Data actors.

    python -m vlcore extract --model demo --dataset easy_vqa --limit 400 --out runs/sweep --engine ray --workers 2

The examples become a Ray dataset (`vlcore.run.ray_examples`). `Dataset.map_batches` runs `SweepWorker`, a callable
class that loads the adapter once per worker and reduces each batch with `vlcore.run.sweep.summarize_batch`, the
function the in-process sweep runs: there is one implementation of the statistics.

The output is `vlcore.run.sweep`'s folder format (manifest, parts, merged files; the manifest key is the in-process
sweep's key of the same examples, so either engine resumes the other's folder) at a local path or a URL
(`vlcore.run.sweep_target`). A part is named by a hash of its example ids and written whole, so a batch Ray retries
after a worker died rewrites the same files; merging keeps each example once. ``ray`` is optional: without it
`import_ray` raises a one-line `RayUnavailableError`.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlcore.errors import InputError, VLScopeError
from vlcore.run.ray_examples import RayInput, RowMapper

# The sweep folder has one owner, vlcore.run.sweep: the Ray driver opens, checks and merges it with its functions.
from vlcore.run.sweep import VECTOR_PATCHES, SweepProgress, summarize_batch, sweep_key
from vlcore.storage.sweeps import claim, completed_ids, consolidate, drop_stale, read_manifest, vectors_to_bytes, write_manifest
from vlcore.run.sweep_target import SweepTarget, open_target

RAY_PIN = "ray[data]==2.60.0"
MAX_ATTEMPTS = 4  # tries of one batch (its worker died, an I/O error); then the sweep stops, resumable


class RayUnavailableError(VLScopeError):
    """``--engine ray`` without the optional ``ray[data]`` dependency."""


def import_ray():
    """The ``ray`` module with Ray Data.

    Raises:
        RayUnavailableError: ray is not installed.
    """
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise RayUnavailableError(
            f"the Ray engine needs ray[data], which is not installed: pip install '{RAY_PIN}' (or the [ray] extra), "
            "or drop --engine ray to sweep in this process") from exc
    return ray


# -- the worker ------------------------------------------------------------------------------------------
def part_name(ids: Sequence[str]) -> str:
    """A part's file stem from its example ids: the same batch always writes the same files.

    >>> part_name(["a", "b"]) == part_name(["a", "b"]) != part_name(["a"])
    True
    """
    return "part-r" + hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


class AttemptLog:
    """A Ray actor counting worker starts and batch attempts, so the driver can report retries."""

    def __init__(self) -> None:
        self.batches: Counter = Counter()
        self.workers = 0

    def worker_started(self) -> None:
        self.workers += 1

    def batch_started(self, part: str) -> int:
        """Count an attempt at a batch; returns how many there have been."""
        self.batches[part] += 1
        return self.batches[part]

    def counts(self) -> dict:
        return {"retries": sum(n - 1 for n in self.batches.values()), "worker_starts": self.workers}


class SweepWorker:
    """`map_batches` callable class: loads the adapter once, then summarises and writes each batch it gets.

    Returns, per batch, the ``example_id`` of every example it wrote (the driver counts progress from them) and an
    empty ``error``. A `VLScopeError` (a model the worker cannot load, an unreadable image, out of memory at batch
    size 1) comes back as data instead, one row whose ``error`` is ``"<class>: <message>"``: Ray's wrappers keep
    only the text of an exception raised in a worker, and the driver should stop with the message alone.
    """

    def __init__(self, model: str, device: str, target: SweepTarget, mapper: RowMapper, top_k: int,
                 vector_patches: int | None, log=None, batch_hook: Callable[[list[str]], None] | None = None) -> None:
        from transformers.utils import logging as hf_logging

        from vlcore.models.registry import load_adapter

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        self.target, self.mapper, self.top_k, self.vector_patches = target, mapper, top_k, vector_patches
        self.log, self.batch_hook, self.adapter, self.error = log, batch_hook, None, None
        try:
            self.adapter = load_adapter(model, device=device)
        except VLScopeError as exc:  # reported with the first batch
            self.error = exc
        self._tell("worker_started")

    def __call__(self, batch) -> dict:
        try:
            if self.error is not None:
                raise self.error
            examples = self.mapper.examples(batch)
            ids = [e.example_id for e in examples]
            attempt = self._tell("batch_started", part_name(ids))
            if attempt is not None and attempt > MAX_ATTEMPTS:
                raise InputError(f"the batch of {ids[0]} .. {ids[-1]} failed {MAX_ATTEMPTS} times (its worker died "
                                 "or could not write); finished batches are kept: check the workers' logs, then resume")
            if self.batch_hook is not None:
                self.batch_hook(ids)
            self._run(examples)
        except VLScopeError as exc:
            return {"example_id": np.array([""], dtype=object),
                    "error": np.array([f"{type(exc).__name__}: {exc}"], dtype=object)}
        return {"example_id": np.array(ids, dtype=object), "error": np.array([""] * len(ids), dtype=object)}

    def _tell(self, method: str, *args):
        if self.log is None:
            return None
        import ray

        return ray.get(getattr(self.log, method).remote(*args))

    def _run(self, examples: list) -> None:
        """Summarise and write ``examples``; on out-of-memory, each half on its own (as the in-process sweep)."""
        from vlcore.errors import DeviceMemoryError
        from vlcore.run.extract import _free_device_memory, is_out_of_memory, memory_message, model_image_input

        try:
            batch = self.adapter.encode([model_image_input(self.adapter, e) for e in examples],
                                        [e.question for e in examples])
            summary = summarize_batch(self.adapter, batch, examples, self.top_k, self.vector_patches)
        except (RuntimeError, MemoryError) as exc:
            if not is_out_of_memory(exc):
                raise
            _free_device_memory(self.adapter)
            if len(examples) == 1:
                message = memory_message(self.adapter, "at batch size 1; finished batches are kept")
                raise DeviceMemoryError(message) from exc
            half = len(examples) // 2
            self._run(examples[:half])
            self._run(examples[half:])
            return
        part = part_name([e.example_id for e in examples])
        self.target.write(f"{part}.heads.parquet", _parquet(summary.heads))
        if summary.vectors is not None:
            self.target.write(f"{part}.vectors.safetensors", vectors_to_bytes(summary.vectors))
        self.target.write(f"{part}.predictions.parquet", _parquet(summary.predictions))  # last: marks the part done


def _parquet(frame) -> bytes:
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    return buf.getvalue()


# -- the driver ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RaySweepReport:
    """What a Ray sweep did."""

    out: str
    examples: int  # in the sweep
    new: int  # computed in this run
    skipped: int  # already in the folder
    seconds: float
    retries: int  # batch attempts after the first (a worker died, an I/O error)
    restarts: int  # workers started again after one died
    workers: int
    complete: bool

    @property
    def rate(self) -> float:
        return self.new / max(self.seconds, 1e-9)

    def summary(self) -> str:
        """One line: examples, time, examples/s, retries."""
        done = "complete" if self.complete else "unfinished"
        return (f"ray sweep {done}: {self.examples} examples ({self.new} computed, {self.skipped} already done) in "
                f"{self.seconds:.1f} s, {self.rate:.1f} examples/s on {self.workers} workers, {self.retries} "
                f"retries, {self.restarts} worker restarts -> {self.out}")


def connect(address: str | None = None):
    """Start a local Ray (``address`` None) or join the cluster at ``address`` ("auto", ``ray://host:port``).

    The workers of a local Ray inherit this process's environment, with this checkout on ``PYTHONPATH``, so they
    start without a runtime env. A cluster gets the ``vlcore`` package as a ``py_modules`` runtime env (its image
    needs the rest of ``requirements.txt``). An initialised Ray is used as it is. Returns ``ray``.
    """
    import os

    ray = import_ray()
    if ray.is_initialized():
        return ray
    package = Path(__file__).resolve().parent
    if address is None:
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(package.parent), os.environ.get("PYTHONPATH")) if p)
        ray.init(address="local", include_dashboard=False)
    else:
        ray.init(address=address, runtime_env={"py_modules": [str(package)]})
    return ray


def run_ray_sweep(
    model: str,
    source: RayInput,
    out: str | Path,
    *,
    dataset: str = "",
    workers: int = 1,
    gpus_per_worker: float = 0.0,
    batch_size: int = 8,
    top_k: int = 5,
    vector_patches: int | None = VECTOR_PATCHES,
    address: str | None = None,
    progress: Callable[[SweepProgress], None] | None = None,
    batch_hook: Callable[[list[str]], None] | None = None,
) -> RaySweepReport:
    """Run a model over ``source`` on Ray and write the sweep folder at ``out`` (a path or a URL), resumably.

    Args:
        model: "demo", a checkpoint folder the workers can read, or a hub id.
        source: the examples (`ray_input`).
        out: local folder or URL (``s3://bucket/sweeps/x``); a folder holding part of this sweep is resumed.
        dataset: dataset name recorded in the manifest (and in the sweep key).
        workers: model-holding actors.
        gpus_per_worker: GPUs each actor reserves (fractions share a GPU); 0 runs on CPU.
        batch_size: examples per forward pass.
        top_k / vector_patches: as `vlcore.run.sweep.run_sweep`.
        address: the Ray cluster (see `connect`).
        progress: called after each batch on the driver.
        batch_hook: called on the worker with a batch's ids before it runs (fault injection, instrumentation).

    Raises:
        RayUnavailableError: ray is not installed.
        InputError: duplicate example ids. StoreError: ``out`` holds another sweep.
        VLScopeError: what a worker raised (a bad image, out of memory at batch size 1); finished batches are kept.
    """
    if len(set(source.ids)) != len(source.ids):
        raise InputError("the examples to sweep have duplicate ids; give every example a unique id")
    import_ray()
    model, adapter = _model_for_workers(model)
    key = sweep_key(adapter, dataset, source.ids, top_k, vector_patches)
    target = open_target(out)
    with target.staged() as staging:  # the folder itself, or a local copy of a URL's
        notices = drop_stale(staging)
        claim(staging, key, adapter.model_id, dataset, len(source.ids), top_k, batch_size, vector_patches,
               block=adapter.default_block)  # the block the workers' summarize_batch reduces
        done = completed_ids(staging, notices)
        target.push(staging)
        todo = [i for i, e in enumerate(source.ids) if e not in done]
        start, counts = time.perf_counter(), {"retries": 0, "worker_starts": workers}
        if todo:
            connect(address)
            counts = _execute(model, source, target, todo, len(done), workers=workers, gpus=gpus_per_worker,
                              batch_size=batch_size, top_k=top_k, vector_patches=vector_patches, progress=progress,
                              batch_hook=batch_hook)
        seconds = time.perf_counter() - start
        target.pull(staging, only_new=True)  # the parts the workers wrote to a URL
        write_manifest(staging, {**read_manifest(staging), "notices": notices, "engine": "ray", "workers": workers,
                                  "gpus_per_worker": gpus_per_worker})
        complete = completed_ids(staging) >= set(source.ids)
        if complete:
            consolidate(staging, source.ids)
        target.push(staging)
    return RaySweepReport(str(out), len(source.ids), len(todo), len(done), seconds, counts["retries"],
                          max(0, counts["worker_starts"] - workers), workers, complete)


def _model_for_workers(model: str):
    """``(source, adapter)``: the model as the workers should load it (a local folder as an absolute path, never
    "demo") and the driver's CPU copy, which only fingerprints it for the manifest."""
    from vlcore.models.registry import load_adapter, resolve_source

    path, local = resolve_source(model)
    source = str(Path(path).resolve()) if local else path
    return source, load_adapter(source, device="cpu")


def _execute(model, source, target, todo, n_done, *, workers, gpus, batch_size, top_k, vector_patches,
             progress, batch_hook) -> dict:
    """Map the batches over the workers, reporting progress; returns the attempt counts."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    ctx = DataContext.get_current()
    saved = ctx.enable_progress_bars, ctx.actor_task_retry_on_errors
    # Ray Data restarts a dead actor and retries its batch (max_restarts / max_task_retries default to -1 for
    # actor pools); OSError (a failed write to remote storage) is retried too; AttemptLog bounds the tries.
    ctx.enable_progress_bars, ctx.actor_task_retry_on_errors = False, [OSError]
    log = ray.remote(num_cpus=0)(AttemptLog).remote()
    results = source.to_ray(todo, batch_size).map_batches(
        SweepWorker, batch_size=batch_size, batch_format="pyarrow", compute=ActorPoolStrategy(size=workers),
        num_cpus=1, num_gpus=gpus or None,
        fn_constructor_kwargs={"model": model, "device": "cuda" if gpus else "cpu", "target": target,
                               "mapper": source.mapper, "top_k": top_k, "vector_patches": vector_patches, "log": log,
                               "batch_hook": batch_hook},
    )
    start, finished = time.perf_counter(), 0
    try:
        for batch in results.iter_batches(batch_size=None, batch_format="pyarrow"):
            _raise_worker_error(batch.column("error").to_pylist())
            finished += batch.num_rows
            if progress is not None:
                rate = finished / max(time.perf_counter() - start, 1e-9)
                eta = (len(todo) - finished) / rate
                progress(SweepProgress(n_done + finished, n_done + len(todo), n_done, rate, eta))
        return ray.get(log.counts.remote())
    finally:
        ray.kill(log)
        ctx.enable_progress_bars, ctx.actor_task_retry_on_errors = saved


def _raise_worker_error(errors: list[str]) -> None:
    """Raise the first `VLScopeError` a worker returned (``"<class>: <message>"``), as its own class.

    >>> _raise_worker_error(["", ""])
    >>> _raise_worker_error(["", "InputError: no image"])
    Traceback (most recent call last):
    vlcore.errors.InputError: no image
    """
    import vlcore.errors

    for error in errors:
        if error:
            name, message = error.split(": ", 1)
            cls = getattr(vlcore.errors, name, VLScopeError)
            raise cls(message) if isinstance(cls, type) and issubclass(cls, VLScopeError) else VLScopeError(message)
