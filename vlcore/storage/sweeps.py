"""The sweep folder: its one owner. Every reader and writer of a sweep's files goes through here.

Layout of a sweep folder (``<store>/sweeps/<key>/`` or the folder a user names)::

    manifest.json                     key, model, dataset, settings, block, schema, complete
    part-<ids>.predictions.parquet    one batch's predictions (`PREDICTION_COLUMNS`)
    part-<ids>.heads.parquet          its per-head summaries (example_id, layer, head, metric columns)
    part-<ids>.vectors.safetensors    its sampled token vectors (when the sweep keeps vectors)
    part-<ids>.probe.safetensors      its probe data (a probe sweep)
    predictions.parquet, head_stats.parquet, vectors.safetensors, probe.safetensors
                                      the merged files, once the sweep is complete

Parts are written atomically; a part that does not parse is dropped with its twins and computed again; a folder
whose manifest is damaged or of another schema is emptied. Safetensors are parsed by `vlcore.storage.store`
(`safetensors_from_bytes`), parquet by `vlcore.storage.tables`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from vlcore.errors import StoreError
from vlcore.storage.store import DamagedFileError, atomic_write_bytes, safetensors_from_bytes
from vlcore.storage.tables import parquet_from_bytes
from vlcore.trace import TRACE_VERSION

VECTORS_FILE = "vectors.safetensors"
PREDICTION_COLUMNS = [
    "example_id", "question", "gold", "category", "prediction", "probability", "correct",
    "top_k", "text_truncated", "n_text_tokens", "n_image_tokens",
]
SUMMARY_COLUMNS = ["example_id", "layer", "head", "metric", "value"]  # the tidy per-head table
PROBE_FILE = "probe.safetensors"
PROBE_VERSION = "2"  # the probe payload's format; part of a probe sweep's key: a change makes a new sweep
PROBE_ARRAYS = ("patch_example", "patch_rc", "patch_cover", "word_example", "pair_word", "pair_rc", "pair_cover",
                "pair_attention")


def drop_stale(out: Path) -> list[str]:
    """Empty a sweep folder whose manifest is damaged or of another schema; returns the notice."""
    path = out / "manifest.json"
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_bytes())  # an OSError of the disk propagates: it says nothing about the sweep
        schema = data.get("schema") if isinstance(data, dict) else "damaged"
    except FileNotFoundError:
        return []
    except ValueError:  # not JSON (or not UTF-8): the manifest is damaged
        schema = "damaged"
    if schema == TRACE_VERSION:
        return []
    for file in out.iterdir():
        if file.is_file() and file.name != ".lock":
            file.unlink(missing_ok=True)
    return [(f"dropped the sweep stored in {out.name[:12]} (manifest schema {schema}, this VLScope writes "
             f"{TRACE_VERSION}); it is computed again")]


def claim(
    out: Path, key: str, model_id: str, dataset: str, n: int, top_k: int, batch_size: int,
    vector_patches: int | None, probe: bool = False, block: str | None = None,
) -> None:
    """Write the manifest, or check that the folder's sweep is this one."""
    path = out / "manifest.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
        if old.get("key") not in (None, key):
            raise StoreError(
                f"{out} holds a sweep of {old.get('model_id')} on {old.get('n_examples')} examples of "
                f"{old.get('dataset')!r} with other settings; use another output folder for this one"
            )
        if old.get("key") == key:
            return
    write_manifest(out, {
        "key": key, "model_id": model_id, "dataset": dataset, "n_examples": n, "top_k": top_k,
        "batch_size": batch_size, "created": time.time(), "complete": False, "schema": TRACE_VERSION,
        "vector_patches": vector_patches, "block": block, **({"probe": True} if probe else {}),
    })


def completed_ids(out: Path, notices: list[str] | None = None) -> set[str]:
    """Example ids already summarised in a sweep folder (merged files or complete parts).

    A part (or merged file) whose predictions, head stats or (when the sweep keeps them) vectors are
    missing or do not parse (`DamagedFileError`) is deleted with its twins, so it is recomputed; ``notices``
    gets a line. Any other failure (``MemoryError``, a disk error, a bug) propagates and deletes nothing.
    """
    ids: set[str] = set()
    with_vectors = read_manifest(out).get("vector_patches") is not None
    with_probe = bool(read_manifest(out).get("probe"))
    merged = out / "predictions.parquet"
    files = ([merged] if merged.exists() else []) + sorted(out.glob("part-*.predictions.parquet"))
    for path in files:
        if path == merged:
            heads, vectors = out / "head_stats.parquet", out / VECTORS_FILE
        else:
            heads = out / path.name.replace(".predictions.parquet", ".heads.parquet")
            vectors = out / path.name.replace(".predictions.parquet", ".vectors.safetensors")
        if with_probe and not probe_part_ok(probe_part_path(path)):  # a probe sweep's batch needs its probe part
            for twin in (path, heads, vectors, probe_part_path(path)):
                twin.unlink(missing_ok=True)
            if notices is not None:
                notices.append(f"dropped sweep results {path.name} without a readable probe part; they were "
                               "computed again")
            continue
        try:
            _read_parquet(heads, columns=["example_id"])
            if with_vectors:
                _vector_ids(vectors)
            ids.update(_read_parquet(path, columns=["example_id"])["example_id"].astype(str))
        except (FileNotFoundError, DamagedFileError) as exc:  # a missing twin or a corrupt file: drop, recompute
            for twin in (path, heads, vectors):
                twin.unlink(missing_ok=True)
            if notices is not None:
                notices.append(f"dropped damaged sweep results {path.name} ({_cause(exc)}); they were "
                               "computed again")
    return ids


def read_manifest(out: Path) -> dict:
    try:
        return json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}


def vectors_to_bytes(part: dict) -> bytes:
    """A sweep's sampled token vectors (`gather_token_vectors` plus ``example_ids``) as safetensors.

    Strings (example ids, token texts) go into the header as JSON; patch thumbnails are stored for
    patch tokens only.
    """
    from safetensors.numpy import save

    is_patch = np.asarray(part["patch_rc"])[:, 0] >= 0
    tensors = {
        "vectors": np.ascontiguousarray(part["vectors"], dtype=np.float16),
        "example": np.asarray(part["example"], dtype=np.int32),
        "token": np.asarray(part["token"], dtype=np.int32),
        "modality": np.asarray(part["modality"], dtype=np.int8),
        "special": np.asarray(part["special"], dtype=np.uint8),
        "patch_rc": np.asarray(part["patch_rc"], dtype=np.int16),
        "thumbs": np.ascontiguousarray(np.asarray(part["thumbs"], dtype=np.uint8)[is_patch]),
    }
    meta = {"example_ids": json.dumps(list(part["example_ids"])), "text": json.dumps(list(part["text"])),
            "schema": "1"}
    return save(tensors, metadata=meta)


def vectors_from_bytes(data: bytes) -> dict:
    """Inverse of `vectors_to_bytes` (thumbnails expanded back to one per token).

    Raises:
        DamagedFileError: a damaged file (not safetensors, a header or shapes that do not match); a
            `ValueError`. Anything else (``MemoryError``, a bug) propagates.
    """
    arrays, header = safetensors_from_bytes(data, "vectors file")
    try:
        example_ids, text = json.loads(header["example_ids"]), json.loads(header["text"])
    except (KeyError, ValueError) as exc:
        raise DamagedFileError(f"damaged vectors file: no example ids or token texts ({exc})") from exc
    _check_vector_shapes(arrays, example_ids, text)
    part = {k: v for k, v in arrays.items() if k != "thumbs"}
    part["example_ids"], part["text"] = example_ids, text
    part["special"] = part["special"].astype(bool)
    is_patch = part["patch_rc"][:, 0] >= 0
    part["thumbs"] = np.zeros((len(is_patch), *arrays["thumbs"].shape[1:]), dtype=np.uint8)
    part["thumbs"][is_patch] = arrays["thumbs"]
    return part


def _check_vector_shapes(arrays: dict, example_ids, text) -> None:
    """Raise `DamagedFileError` unless the arrays and header of a vectors file fit together."""
    def fail(what: str):
        raise DamagedFileError(f"damaged vectors file: {what}")

    names = ("vectors", "example", "token", "modality", "special", "patch_rc", "thumbs")
    if missing := [n for n in names if n not in arrays]:
        fail(f"no {missing[0]!r} array")
    if not isinstance(example_ids, list) or not isinstance(text, list):
        fail("example ids or token texts are not lists")
    t = len(arrays["example"])
    if arrays["vectors"].ndim != 3 or arrays["vectors"].shape[1] != t or arrays["patch_rc"].shape != (t, 2):
        fail(f"{t} tokens, vectors {arrays['vectors'].shape}, patch_rc {arrays['patch_rc'].shape}")
    if any(len(arrays[n]) != t for n in ("token", "modality", "special")) or len(text) != t:
        fail(f"per-token fields of different lengths for {t} tokens")
    if t and not 0 <= int(arrays["example"].min()) <= int(arrays["example"].max()) < len(example_ids):
        fail("token rows point outside the example ids")
    if arrays["thumbs"].ndim != 4 or len(arrays["thumbs"]) != int((arrays["patch_rc"][:, 0] >= 0).sum()):
        fail(f"{len(arrays['thumbs'])} thumbnails for {int((arrays['patch_rc'][:, 0] >= 0).sum())} patch tokens")


def _vector_ids(path: Path) -> list[str]:
    """Example ids of a vectors file (reads the whole file: it also checks it is readable)."""
    return vectors_from_bytes(path.read_bytes())["example_ids"]


def _vector_files(out: Path) -> list[Path]:
    merged = out / VECTORS_FILE
    return ([merged] if merged.exists() else []) + sorted(out.glob("part-*.vectors.safetensors"))


def merge_vector_parts(parts: Sequence[dict], keep_ids: Sequence[str] | None = None) -> dict | None:
    """Concatenate vector parts into one, each example once (first seen), optionally ordered by ``keep_ids``.

    Returns:
        A dict of the `gather_token_vectors` form with ``example`` indexing ``example_ids``; None when
        ``parts`` is empty or keeps nothing.
    """
    if not parts:
        return None
    ids_in = [[str(part["example_ids"][i]) for i in part["example"]] for part in parts]
    order = list(keep_ids) if keep_ids is not None else list(dict.fromkeys(e for ids in ids_in for e in ids))
    rank = {eid: i for i, eid in enumerate(order)}
    seen: dict[str, int] = {}
    picks = []  # (example rank, part index, row)
    for p, ids in enumerate(ids_in):
        for row, eid in enumerate(ids):
            if eid in rank and seen.setdefault(eid, p) == p:
                picks.append((rank[eid], p, row))
    if not picks:
        return None
    picks.sort()  # by example, then part, then row (token order within an example)
    offsets = np.cumsum([0] + [len(part["example"]) for part in parts])
    flat = np.array([offsets[p] + r for _, p, r in picks], dtype=np.int64)
    used = [e for e in order if e in seen]
    new_index = {eid: i for i, eid in enumerate(used)}

    def cat(name: str, axis: int = 0) -> np.ndarray:
        return np.take(np.concatenate([part[name] for part in parts], axis=axis), flat, axis=axis)

    texts = [parts[p]["text"][r] for _, p, r in picks]
    example = np.array([new_index[ids_in[p][r]] for _, p, r in picks], dtype=np.int32)
    return {
        "vectors": cat("vectors", axis=1), "example": example, "token": cat("token"), "text": texts,
        "modality": cat("modality"), "special": cat("special"), "patch_rc": cat("patch_rc"),
        "thumbs": cat("thumbs"), "example_ids": used,
    }


def load_sweep_vectors(out_dir: str | Path) -> dict | None:
    """The sampled token vectors of a sweep folder, finished or not (merged file plus parts).

    Returns:
        The `merge_vector_parts` dict (``vectors`` float16 ``[L + 1, T, D]``, per-token fields, and
        ``example_ids``), or None when the sweep kept no vectors (made before vectors existed, or
        with ``vector_patches=None``). Files that vanished (merged meanwhile) or are damaged are skipped
        (never deleted here: the sweep itself drops and recomputes them); other errors propagate.
    """
    parts = []
    for path in _vector_files(Path(out_dir)):
        try:
            parts.append(vectors_from_bytes(path.read_bytes()))
        except (FileNotFoundError, DamagedFileError):
            continue
    return merge_vector_parts(parts)


def load_sweep(out_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(predictions, head_stats)`` of a sweep folder, finished or not (merged file plus parts)."""
    out = Path(out_dir)
    pred_files = [p for p in [out / "predictions.parquet"] if p.exists()] + sorted(out.glob("part-*.predictions.parquet"))
    head_files = [p for p in [out / "head_stats.parquet"] if p.exists()] + sorted(out.glob("part-*.heads.parquet"))
    preds = [_read(p) for p in pred_files]
    heads = [_read(p) for p in head_files]
    preds, heads = [p for p in preds if p is not None], [h for h in heads if h is not None]
    if not preds:
        return pd.DataFrame(columns=PREDICTION_COLUMNS), pd.DataFrame(columns=SUMMARY_COLUMNS)
    heads = pd.concat(heads, ignore_index=True) if heads else pd.DataFrame(columns=SUMMARY_COLUMNS)
    return pd.concat(preds, ignore_index=True), heads


def _read(path: Path) -> pd.DataFrame | None:
    """A parquet file, or None when it vanished (another session merged it) or is damaged.

    A damaged file (one that does not parse as parquet with an ``example_id`` column) is deleted and the
    sweep's manifest marked unfinished with a notice, so that the next start of the sweep recomputes what
    it held. Any other failure (``MemoryError``, a disk error, a bug) propagates and deletes nothing.
    """
    try:
        return _read_parquet(path)
    except FileNotFoundError:
        return None
    except DamagedFileError as exc:
        path.unlink(missing_ok=True)
        manifest = read_manifest(path.parent)
        if manifest:
            note = (f"dropped damaged sweep results {path.name} ({_cause(exc)}); start the sweep again "
                    "to recompute them")
            write_manifest(path.parent, {**manifest, "complete": False,
                                          "notices": [*manifest.get("notices", []), note]})
        return None


def _cause(exc: BaseException) -> str:
    """The name of what went wrong: the parser's own error under a `DamagedFileError`, else the error's."""
    return type(exc.__cause__ or exc).__name__


def _read_parquet(path: Path, columns: list[str] | None = None) -> pd.DataFrame:
    """A sweep parquet file; raises `DamagedFileError` when it does not parse or has no ``example_id``."""
    return parquet_from_bytes(path.read_bytes(), path.name, columns=columns, required=("example_id",))


def consolidate(out: Path, ids: list[str]) -> None:
    """Merge every part (and an earlier merged file) into the two files, in example order."""
    preds, heads = load_sweep(out)
    order = {eid: i for i, eid in enumerate(ids)}
    preds = preds[preds["example_id"].isin(order)].drop_duplicates("example_id")
    preds = preds.sort_values("example_id", key=lambda c: c.map(order)).reset_index(drop=True)
    heads = heads[heads["example_id"].astype(str).isin(order)]
    heads = heads.drop_duplicates(["example_id", "layer", "head", "metric"])
    heads = heads.sort_values("example_id", key=lambda c: c.astype(str).map(order), kind="stable")
    write_parquet(out / "head_stats.parquet", heads.reset_index(drop=True))
    vectors = load_sweep_vectors(out)
    if vectors is not None:
        atomic_write_bytes(out / VECTORS_FILE, vectors_to_bytes(merge_vector_parts([vectors], ids)))
    if read_manifest(out).get("probe"):
        consolidate_probe(out, ids)
    write_parquet(out / "predictions.parquet", preds)  # written last: it marks completion
    for part in [*out.glob("part-*.parquet"), *out.glob("part-*.vectors.safetensors"), *out.glob("part-*.probe.safetensors")]:
        part.unlink()
    manifest = json.loads((out / "manifest.json").read_text())
    write_manifest(out, {**manifest, "complete": True})


def write_parquet(path: Path, frame: pd.DataFrame) -> None:
    import io

    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    atomic_write_bytes(path, buf.getvalue())


def write_manifest(out: Path, manifest: dict) -> None:
    manifest["updated"] = time.time()
    atomic_write_bytes(out / "manifest.json", json.dumps(manifest, indent=1).encode())


def probe_to_bytes(part: dict) -> bytes:
    """A probe payload as safetensors (strings and labels in the header as JSON)."""
    from safetensors.numpy import save

    tensors = {name: np.ascontiguousarray(part[name]) for name in PROBE_ARRAYS}
    meta = {name: json.dumps(part[name]) for name in ("example_ids", "labels", "word_text", "word_role", "word_tokens")}
    return save(tensors, metadata={**meta, "schema": PROBE_VERSION})


def probe_from_bytes(data: bytes) -> dict:
    """Inverse of `probe_to_bytes`.

    Raises:
        ValueError: a damaged file.
    """
    from safetensors.numpy import load

    try:
        part = dict(load(data))
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]
        for name in ("example_ids", "labels", "word_text", "word_role", "word_tokens"):
            part[name] = json.loads(header[name])
        missing = [name for name in PROBE_ARRAYS if name not in part]
        if missing:
            raise KeyError(f"no {', '.join(missing)}")
    except Exception as exc:  # safetensors raises its own error type; any failure means damaged
        raise ValueError(f"damaged probe file: {type(exc).__name__}: {exc}") from exc
    return part


def probe_part_ok(path: Path) -> bool:
    """Whether a probe file exists and parses (a sweep recomputes a batch whose probe part is not)."""
    try:
        probe_from_bytes(path.read_bytes())
    except (FileNotFoundError, ValueError):
        return False
    return True


def probe_files(out: Path) -> list[Path]:
    """The merged probe file (if any) then the parts, in order."""
    merged = out / PROBE_FILE
    return ([merged] if merged.exists() else []) + sorted(out.glob("part-*.probe.safetensors"))


def probe_part_path(predictions_part: Path) -> Path:
    """The probe twin of a sweep's predictions file (part or merged)."""
    if predictions_part.name == "predictions.parquet":
        return predictions_part.parent / PROBE_FILE
    return predictions_part.parent / predictions_part.name.replace(".predictions.parquet", ".probe.safetensors")


def merge_probe_parts(parts: Sequence[dict], keep_ids: Sequence[str] | None = None) -> dict | None:
    """Concatenate probe parts, each example once (first seen), ordered by ``keep_ids`` when given.

    Returns:
        One payload whose example indices point into its ``example_ids``; None when nothing is kept.
    """
    seen: dict[str, tuple[int, int]] = {}  # example id -> (part, row)
    for p, part in enumerate(parts):
        for row, eid in enumerate(part["example_ids"]):
            seen.setdefault(str(eid), (p, row))
    order = [e for e in (keep_ids if keep_ids is not None else seen) if e in seen]
    if not order:
        return None
    new_index = {eid: i for i, eid in enumerate(order)}
    names = sorted({name for part in parts for name in part["labels"]})
    labels = {name: [None] * len(order) for name in names}
    pieces: dict[str, list] = {name: [] for name in (*PROBE_ARRAYS, "word_text", "word_role", "word_tokens")}
    n_words = 0
    for p, part in enumerate(parts):
        remap = np.array([new_index.get(str(e), -1) if seen.get(str(e), (None,))[0] == p else -1
                          for e in part["example_ids"]], dtype=np.int64)
        for name, values in part["labels"].items():
            for row, value in enumerate(values):
                if remap[row] >= 0:
                    labels[name][remap[row]] = value
        keep_patch, keep_word = remap[part["patch_example"]] >= 0, remap[part["word_example"]] >= 0
        word_new = np.cumsum(keep_word) - 1 + n_words
        keep_pair = keep_word[part["pair_word"]] if len(part["pair_word"]) else np.zeros(0, bool)
        pieces["patch_example"].append(remap[part["patch_example"]][keep_patch])
        for name in ("patch_rc", "patch_cover"):
            pieces[name].append(part[name][keep_patch])
        pieces["word_example"].append(remap[part["word_example"]][keep_word])
        for name in ("word_text", "word_role", "word_tokens"):
            pieces[name].append([v for v, k in zip(part[name], keep_word) if k])
        pieces["pair_word"].append(word_new[part["pair_word"]][keep_pair])
        for name in ("pair_rc", "pair_cover", "pair_attention"):
            pieces[name].append(part[name][keep_pair])
        n_words += int(keep_word.sum())
    merged = {name: np.concatenate(pieces[name]) for name in PROBE_ARRAYS}
    for name in ("patch_example", "word_example", "pair_word"):
        merged[name] = merged[name].astype(np.int32)
    merged.update({name: [v for chunk in pieces[name] for v in chunk] for name in ("word_text", "word_role", "word_tokens")})
    return {**merged, "example_ids": order, "labels": labels}


def load_sweep_probe(out_dir: str | Path) -> dict | None:
    """The probe payload of a sweep folder, finished or not (merged file plus parts); None when the sweep
    stored none. Unreadable files are skipped."""
    parts = []
    for path in probe_files(Path(out_dir)):
        try:
            parts.append(probe_from_bytes(path.read_bytes()))
        except (OSError, ValueError):
            continue
    return merge_probe_parts(parts)


def consolidate_probe(out: Path, ids: Sequence[str]) -> None:
    """Merge a finished sweep's probe parts into `PROBE_FILE` (the parts are deleted by the caller)."""
    merged = load_sweep_probe(out)
    if merged is not None:
        atomic_write_bytes(out / PROBE_FILE, probe_to_bytes(merge_probe_parts([merged], ids)))
