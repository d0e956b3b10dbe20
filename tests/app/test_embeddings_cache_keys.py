"""The embeddings page's caches are keyed on what a token set holds, never on example ids, text or folder names:
the same id from two datasets (another gold answer, another image) or a sweep folder of the same name and
file stamps with other vectors must not return the other one's fits, tables or thumbnails."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct

import numpy as np

from vlcore.ui import embeddings as emb


def one_trace(adapter, example_id: str = "t/0"):
    from tests.test_extract import examples
    from vlcore.run.extract import extract_trace

    ex = examples(1)[0]
    return extract_trace(adapter, ex.load_image(), ex.question, example_id)


def test_same_id_with_another_gold_answer_gets_its_own_correctness(tiny_adapter):
    trace = one_trace(tiny_adapter)
    right = dataclasses.replace(trace, gold=(trace.predicted,))
    wrong = dataclasses.replace(trace, gold=("an answer the model never gives",))
    (set_a, key_a), (set_b, key_b) = emb.example_token_set(right), emb.example_token_set(wrong)
    assert key_a != key_b  # same model, id, text and hidden states
    frame_a = emb.projection_frame(key_a, 1, "pca", "sign", 30.0, set_a)
    frame_b = emb.projection_frame(key_b, 1, "pca", "sign", 30.0, set_b)
    assert set(frame_a["correct"]) == {"correct"} and set(frame_b["correct"]) == {"incorrect"}
    assert emb.example_token_set(right)[1] == key_a  # the same trace: the same key (remembered)


def test_same_id_with_another_image_gets_its_own_thumbnails(tiny_adapter):
    trace = one_trace(tiny_adapter)
    other = trace.with_arrays(image=np.ascontiguousarray(255 - trace.image))
    (set_a, key_a), (set_b, key_b) = emb.example_token_set(trace), emb.example_token_set(other)
    assert key_a != key_b
    thumbs_a, thumbs_b = emb.thumbnails(key_a, set_a), emb.thumbnails(key_b, set_b)
    patches = [i for i, u in enumerate(thumbs_a) if u]
    assert patches and all(thumbs_a[i] != thumbs_b[i] for i in patches)
    row = int(np.flatnonzero(set_a.tokens["kind"].to_numpy() == "text")[0])
    near_a = emb.neighbours(key_a, 1, row, 3, set_a)
    near_b = emb.neighbours(key_b, 1, row, 3, set_b)
    image_a, image_b = near_a[near_a["modality"] == "image"], near_b[near_b["modality"] == "image"]
    assert image_a["row"].tolist() == image_b["row"].tolist()  # same vectors, same neighbours
    assert all(a != b for a, b in zip(image_a["patch"], image_b["patch"]))  # each with its own image


def _change_one_vector(path) -> None:
    """Rewrite one float16 element of the ``vectors`` tensor in place (same size)."""
    data = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    start = 8 + header_len + header["vectors"]["data_offsets"][0]
    value = np.frombuffer(bytes(data[start : start + 2]), np.float16)[0]
    data[start : start + 2] = np.float16(value + 1.0).tobytes()
    path.write_bytes(bytes(data))


def test_two_sweep_folders_with_one_name_and_one_stamp_get_their_own_results(tiny_adapter, tmp_path):
    from tests.test_extract import examples
    from vlcore.run.sweep import run_sweep

    first = tmp_path / "a" / "sweep-1"
    run_sweep(tiny_adapter, examples(4), first, batch_size=2, vector_patches=3)
    second = tmp_path / "b" / "sweep-1"
    shutil.copytree(first, second)
    _change_one_vector(second / "vectors.safetensors")
    for src in first.iterdir():  # same names, sizes and modification times: only the content differs
        stat = src.stat()
        os.utime(second / src.name, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    (set_a, key_a), (set_b, key_b) = emb.sweep_token_set(first), emb.sweep_token_set(second)
    assert not np.array_equal(set_a.vectors, set_b.vectors)
    assert key_a != key_b
    fit_a = emb.fit_layer(key_a, 0, "pca", "none", 30.0, set_a)
    fit_b = emb.fit_layer(key_b, 0, "pca", "none", 30.0, set_b)
    assert not np.array_equal(fit_a, fit_b)
    assert emb.sweep_token_set(first)[1] == key_a  # unchanged files: the same key
