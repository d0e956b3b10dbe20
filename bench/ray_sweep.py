"""Benchmark: the same easy-VQA sweep in this process and on a local Ray, side by side in one run.

    python bench/ray_sweep.py [--examples 400] [--workers 2] [--batch-size 8] [--rounds 1]

The bundled demo model sweeps the first ``--examples`` easy-VQA test questions twice into fresh folders: in this
process (`vlcore.run.sweep.run_sweep`, torch's default threads) and with `vlcore.run.ray_sweep.run_ray_sweep` on a local
Ray with ``--workers`` one-CPU workers. Each time covers what a user waits for once the cluster is up: loading the
model (the driver's copy and every worker's), the sweep, writing and merging the folder. Starting the local Ray is
shown on its own line (a cluster is started once and then runs many sweeps). With CUDA, a GPU row compares one
GPU in this process with one Ray worker per GPU. Both folders are checked to hold the same predictions.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import numpy as np  # noqa: E402
import torch  # noqa: E402

from vlcore.data.easy_vqa import easy_vqa_examples  # noqa: E402
from vlcore.models.registry import load_adapter  # noqa: E402
from vlcore.run.ray_examples import ray_input  # noqa: E402
from vlcore.run.ray_sweep import connect, run_ray_sweep  # noqa: E402
from vlcore.run.sweep import run_sweep
from vlcore.storage.sweeps import load_sweep

DATASET = "easy_vqa/test"


def in_process(n: int, batch_size: int, device: str, out: Path) -> float:
    start = time.perf_counter()
    adapter = load_adapter("demo", device=device)
    run_sweep(adapter, easy_vqa_examples("test", n), out, dataset=DATASET, batch_size=batch_size)
    return time.perf_counter() - start


def on_ray(n: int, batch_size: int, workers: int, gpus: float, out: Path) -> tuple[float, object]:
    start = time.perf_counter()
    report = run_ray_sweep("demo", ray_input("easy_vqa", "test", n), out, dataset=DATASET, batch_size=batch_size,
                           workers=workers, gpus_per_worker=gpus)
    return time.perf_counter() - start, report


def same_predictions(a: Path, b: Path) -> bool:
    pa, pb = load_sweep(a)[0], load_sweep(b)[0]
    same = ["example_id", "prediction"]
    return pa[same].equals(pb[same]) and np.allclose(pa["probability"], pb["probability"], rtol=1e-3, atol=1e-5)


def row(label: str, t_local: float, t_ray: float, n: int, target: str) -> str:
    return (f"| {label:<34} | {n / t_local:>15.1f} | {n / t_ray:>8.1f} | {t_local:>9.1f} | {t_ray:>6.1f} | "
            f"{t_ray / t_local:>8.2f}x | {target:>6} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=400)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1, help="in-process and Ray runs, in turn, each on new folders")
    args = parser.parse_args()
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    start = time.perf_counter()
    ray = connect(None)
    t_start = time.perf_counter() - start
    cpus = int(ray.cluster_resources().get("CPU", 0))
    rows, checks = [], []
    for r in range(args.rounds):  # in-process then Ray, again: the spread shows the machine's drift
        t_local = in_process(args.examples, args.batch_size, "cpu", tmp / f"local-cpu-{r}")
        t_ray, report = on_ray(args.examples, args.batch_size, args.workers, 0.0, tmp / f"ray-cpu-{r}")
        rows.append(row(f"CPU: {torch.get_num_threads()} threads vs {args.workers} workers", t_local, t_ray,
                        args.examples, "<= 1.3"))
        checks.append(same_predictions(tmp / f"local-cpu-{r}", tmp / f"ray-cpu-{r}"))
    n_gpus = torch.cuda.device_count()
    if n_gpus and ray.cluster_resources().get("GPU", 0) >= n_gpus:
        g_local = in_process(args.examples, args.batch_size, "cuda", tmp / "local-gpu")
        g_ray, _ = on_ray(args.examples, args.batch_size, n_gpus, 1.0, tmp / "ray-gpu")
        rows.append(row(f"GPU: 1 vs {n_gpus} workers x 1 GPU", g_local, g_ray, args.examples, ""))
        checks.append(same_predictions(tmp / "local-gpu", tmp / "ray-gpu"))
    print(f"demo model (vilt-tiny-easyvqa), first {args.examples} easy-VQA test questions, batch {args.batch_size}; "
          f"{os.cpu_count()} CPU cores, Ray sees {cpus}; load average {load_before[0]:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after")
    print(f"local Ray started in {t_start:.1f} s (not in the times below); Ray run: {report.summary()}")
    print(f"| {'setup':<34} | {'in-process ex/s':>15} | {'Ray ex/s':>8} | {'in-proc s':>9} | {'Ray s':>6} | "
          f"{'Ray/in-pr':>9} | {'target':>6} |")
    print(f"|{'-' * 36}|{'-' * 17}|{'-' * 10}|{'-' * 11}|{'-' * 8}|{'-' * 11}|{'-' * 8}|")
    print("\n".join(rows))
    print(f"in-process and Ray folders hold the same predictions: {all(checks)}")
    ray.shutdown()
    return 0 if all(checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
