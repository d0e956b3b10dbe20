"""Load test: N concurrent sessions of the model runner against ONE result store.

    python bench/load.py [--sessions 1 4 8] [--shared 3] [--own 3] [--compute-s 0]

Each session is a separate process (multiprocessing, spawn: AppTest is not thread-safe) driving
``pages/2_Run_Model.py`` through Streamlit's AppTest, as a browser tab would: it opens
``?ex=easy_vqa/test/K`` for ``--shared`` examples that every session opens (in a rotated order, so
sessions collide on the same uncached example) and ``--own`` examples no other session opens. All
sessions of one round share one fresh cache folder (``VLSCOPE_CACHE``), load the bundled demo model
and warm up on a private example first, then start together at a barrier.

Counted per round:

- failures: a page that raised, showed ``st.error``, or did not render its heatmap;
- computations: every call of `vlcore.run.extract.extract_trace` writes a marker file under the cache
  folder; duplicates = computations - distinct examples (the store's file lock should make it 0);
- page time: wall time of one AppTest run of the page, p50 and p95 over all pages of the round.

A last round repeats the largest N with the store's file lock switched off (the naive cache: check,
compute, write) to show the duplicates the lock prevents. ``--compute-s`` adds seconds to every
computation, standing in for a model slower than the bundled demo (whose forward pass is tens of ms).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere; spawned workers re-import this file

RUNNER = "pages/2_Run_Model.py"


def session_examples(index: int, n_shared: int, n_own: int) -> list[str]:
    """The example ids one session opens: the shared ones rotated by ``index``, then its own."""
    shared = [f"easy_vqa/test/{k}" for k in range(n_shared)]
    shared = shared[index % n_shared :] + shared[: index % n_shared] if n_shared else []
    own = [f"easy_vqa/test/{100 + index * n_own + j}" for j in range(n_own)]
    return shared + own


def _count_computations(markers: Path, extra_s: float = 0.0) -> None:
    """Wrap `extract_trace` so that every computation leaves one marker file (and lasts ``extra_s`` longer)."""
    import vlcore.run.extract as extract

    real = extract.extract_trace

    def counted(adapter, image, text, example_id, *args, **kwargs):
        markers.mkdir(parents=True, exist_ok=True)
        (markers / f"{example_id.replace('/', '_')}--{os.getpid()}-{uuid.uuid4().hex[:8]}").touch()
        time.sleep(extra_s)  # stands in for a bigger model's forward pass
        return real(adapter, image, text, example_id, *args, **kwargs)

    extract.extract_trace = counted


def _open(example_id: str):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=600)
    at.query_params["ex"] = example_id
    at.switch_page(RUNNER)
    return at.run()


def _failed(at) -> str:
    if at.exception:
        return f"exception: {at.exception[0].value}"
    if at.error:
        return f"st.error: {at.error[0].value}"
    if not any(c.proto.spec for c in at.get("vega_lite_chart")):
        return "no chart rendered"
    return ""


def session(index: int, cache: str, examples: list[str], barrier, results, no_lock: bool, extra_s: float) -> None:
    """One browser-like session: warm up, wait for the others, open every example once."""
    os.environ.update(VLSCOPE_CACHE=cache, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    import torch

    torch.set_num_threads(1)  # N sessions share the machine's cores, as N server threads would
    if no_lock:
        import contextlib

        import vlcore.storage.store

        vlcore.storage.store.FileLock = lambda path: contextlib.nullcontext()
    out = {"index": index, "times": [], "failures": []}
    try:
        warm = _open(f"easy_vqa/test/{5000 + index}")  # model load and imports, outside the timing
        if _failed(warm):
            out["failures"].append(f"warm-up: {_failed(warm)}")
        _count_computations(Path(cache) / "bench-markers", extra_s)
        barrier.wait(timeout=600)
        for example_id in examples:
            start = time.perf_counter()
            try:
                at = _open(example_id)
                problem = _failed(at)
            except Exception as exc:  # noqa: BLE001 - any crash is a failure to count
                problem = f"{type(exc).__name__}: {exc}"
            out["times"].append(time.perf_counter() - start)
            if problem:
                out["failures"].append(f"{example_id}: {problem}")
    except Exception as exc:  # noqa: BLE001
        out["failures"].append(f"session crashed: {type(exc).__name__}: {exc}")
    results.put(out)


def run_round(n: int, n_shared: int, n_own: int, no_lock: bool = False, extra_s: float = 0.0) -> dict:
    ctx = mp.get_context("spawn")
    cache = tempfile.mkdtemp(prefix=f"vlscope-load-{n}-")
    barrier, results = ctx.Barrier(n), ctx.Queue()
    plans = [session_examples(i, n_shared, n_own) for i in range(n)]
    procs = [ctx.Process(target=session, args=(i, cache, plans[i], barrier, results, no_lock, extra_s)) for i in range(n)]
    for p in procs:
        p.start()
    outs = [results.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join()
    times = sorted(t for o in outs for t in o["times"])
    failures = [f for o in outs for f in o["failures"]]
    markers = list((Path(cache) / "bench-markers").glob("*"))
    distinct = {m.name.split("--")[0] for m in markers}
    wanted = {e for plan in plans for e in plan}
    return {
        "n": n, "lock": not no_lock, "extra_s": extra_s, "pages": len(times), "failures": failures, "computations": len(markers),
        "distinct": len(distinct), "wanted": len(wanted), "duplicates": len(markers) - len(distinct),
        "p50": statistics.median(times) if times else float("nan"),
        "p95": times[min(len(times) - 1, int(round(0.95 * (len(times) - 1))))] if times else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--shared", type=int, default=3, help="examples every session opens")
    parser.add_argument("--own", type=int, default=3, help="examples only one session opens")
    parser.add_argument("--skip-no-lock", action="store_true", help="skip the round without the file lock")
    parser.add_argument("--compute-s", type=float, default=0.0,
                        help="seconds added to every computation (a stand-in for a bigger model)")
    args = parser.parse_args()
    rounds = [run_round(n, args.shared, args.own, extra_s=args.compute_s) for n in args.sessions]
    if not args.skip_no_lock:
        rounds.append(run_round(max(args.sessions), args.shared, args.own, no_lock=True, extra_s=args.compute_s))
    base = rounds[0]["p50"]
    print(f"\nRunner page, {args.shared} shared + {args.own} own examples per session, one store per round, "
          f"{os.cpu_count()} CPU cores\n")
    print("| sessions | file lock | added compute s | page loads | failures | computations | distinct examples | duplicates "
          "| p50 page s | p95 page s | p50 / p50(N=1) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rounds:
        print(f"| {r['n']} | {'on' if r['lock'] else 'off'} | {r['extra_s']:g} | {r['pages']} | {len(r['failures'])} | {r['computations']} "
              f"| {r['distinct']} | {r['duplicates']} | {r['p50']:.2f} | {r['p95']:.2f} | {r['p50'] / base:.1f}x |")
    for r in rounds:
        for f in r["failures"][:5]:
            print(f"  N={r['n']} lock={'on' if r['lock'] else 'off'}: {f}")


if __name__ == "__main__":
    main()
