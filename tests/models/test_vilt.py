"""The ViLT adapter: deterministic patch order, planted patches, truncation, loading errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import grey_image, make_tiny_adapter
from vlcore.charts.base import build_patch_overlay_chart, patch_frame
from vlcore.errors import InputError, ModelLoadError, UnsupportedModelError
from vlcore.run.extract import extract_trace
from vlcore.models.registry import load_adapter


def test_two_extractions_are_bit_identical(tiny_adapter, noise_image):
    a = extract_trace(tiny_adapter, noise_image, "what is the color of the cat?", "x")
    b = extract_trace(tiny_adapter, noise_image, "what is the color of the cat?", "x")
    assert np.array_equal(a.attentions, b.attentions)
    assert np.array_equal(a.hidden, b.hidden)
    assert a.prediction == b.prediction


def test_plain_hf_call_permutes_patches_so_the_adapter_must_not(tiny_adapter, noise_image):
    """The quirk we work around: ViLT's visual_embed returns a new patch order each call."""
    emb = tiny_adapter.vilt.embeddings
    pix = tiny_adapter.image_processor([noise_image], return_tensors="pt")
    torch.manual_seed(1)
    orders = [emb.visual_embed(pix["pixel_values"], pix["pixel_mask"], max_image_length=-1)[2][0][0] for _ in range(2)]
    assert not torch.equal(orders[0], orders[1])
    _, _, rc = tiny_adapter.embed_images(pix["pixel_values"], pix["pixel_mask"])
    expect = torch.tensor([(r, c) for r in range(4) for c in range(6)])
    assert torch.equal(rc[0], expect)  # row-major, every call


def test_layout_of_a_non_square_image(tiny_adapter, noise_image):
    t = extract_trace(tiny_adapter, noise_image, "what is the shape?", "x")
    assert t.grid == (4, 6)
    assert t.image.shape == (32, 48, 3) and t.image.dtype == np.uint8
    assert t.tokens[0] == "[CLS]" and t.tokens[t.special.nonzero()[0][1]] == "[SEP]"
    n_text = int((t.modality == 0).sum())
    assert t.tokens[n_text] == "[IMG]" and t.special[n_text]
    assert t.patch_rc[n_text + 1].tolist() == [0, 0] and t.patch_rc[-1].tolist() == [3, 5]
    assert (t.patch_rc[: n_text + 1] == -1).all()
    n_layers, n_heads, n, n2 = t.attentions.shape
    assert (n_layers, n_heads, n, n2) == (2, 2, t.n_tokens, t.n_tokens)
    assert t.hidden.shape == (3, t.n_tokens, 32)
    assert np.allclose(t.attentions.astype(np.float32).sum(-1), 1.0, atol=2e-3)
    # the image as the model saw it is the input, unnormalised (the processor does not resize it)
    assert np.abs(t.image.astype(int) - np.asarray(noise_image).astype(int)).max() <= 1


def test_mixed_size_batch_pads_patches_last_and_masks_them(tiny_adapter, noise_image):
    small = grey_image(32, 32)
    batch = tiny_adapter.encode([noise_image, small], ["what is it?", "what is it?"])
    assert batch.grids == [(4, 6), (4, 4)]
    rc = batch.patch_rc[1]
    pads = (batch.modality[1] == 1) & ~batch.valid[1]
    assert pads.sum() == 24 - 16 and (rc[pads] == -1).all()
    assert pads[-8:].all()


def planted_adapter(tokenizer_dir):
    """Tiny model whose patch embedding reads a patch's mean red value into channel 0 and whose
    layer-0 keys read that channel, with a constant query: [CLS] must look at the red patch."""
    adapter = make_tiny_adapter(tokenizer_dir)
    vilt = adapter.vilt
    with torch.no_grad():
        proj = vilt.embeddings.patch_embeddings.projection
        proj.weight.zero_()
        proj.weight[0, 0] = 1.0 / 64  # mean of the (normalised) red channel over the 8x8 patch
        proj.bias.zero_()
        proj.bias[1] = 1.0  # a constant channel so that LayerNorm keeps channel 0 informative
        vilt.embeddings.position_embeddings.zero_()
        vilt.embeddings.token_type_embeddings.weight.zero_()
        vilt.embeddings.cls_token.zero_()
        for layer in vilt.encoder.layer:
            att = layer.attention.attention
            att.query.weight.zero_()
            att.query.bias.zero_()
            att.key.weight.zero_()
            att.key.bias.zero_()
            for h in range(adapter.n_heads):
                d = h * (adapter.d_model // adapter.n_heads)
                att.query.bias[d] = 8.0  # every query is the same constant vector
                att.key.weight[d, 0] = 1.0  # keys read the red channel
    return adapter


@pytest.mark.parametrize("cell", [(1, 4), (3, 0), (0, 5)])
def test_planted_patch_lands_at_its_row_and_col(tiny_tokenizer_dir, cell):
    adapter = planted_adapter(tiny_tokenizer_dir)
    t = extract_trace(adapter, grey_image(48, 32, red_cell=cell), "what is the color?", "planted")
    idx, rc = t.patch_positions()
    red_token = idx[(rc[:, 0] == cell[0]) & (rc[:, 1] == cell[1])][0]
    signal = t.hidden[0][idx, 0].astype(np.float32)
    assert t.hidden[0][red_token, 0] > 0.9 and np.argmax(signal) == list(idx).index(red_token)
    for head in range(t.n_heads):
        row = t.attentions[0, head, 0].astype(np.float32)
        assert idx[np.argmax(row[idx])] == red_token
    # ... and in the heatmap's data, on the non-square grid (a row/col swap would move it)
    row = t.attentions[0, :, 0].astype(np.float32).mean(0)
    frame = patch_frame(t, row)
    top = frame.loc[frame["value"].idxmax()]
    assert (top["row"], top["col"]) == cell
    assert (top["x"], top["y"]) == (cell[1] * 8, cell[0] * 8)
    spec = build_patch_overlay_chart(t, row).to_dict()
    heat = next(layer for layer in spec["layer"] if layer["mark"]["type"] == "rect")
    values = spec["datasets"][heat["data"]["name"]]
    best = max(values, key=lambda v: v["value"])
    assert (best["row"], best["col"]) == cell


def test_text_past_forty_positions_is_truncated_and_flagged(tiny_adapter, noise_image):
    long_text = " ".join(["what is the color of the cat"] * 10)
    t = extract_trace(tiny_adapter, noise_image, long_text, "long")
    assert t.text_truncated
    assert int((t.modality == 0).sum()) == 40 and t.meta["n_text_tokens_full"] > 40
    short = extract_trace(tiny_adapter, noise_image, "what is the cat?", "short")
    assert not short.text_truncated


@pytest.mark.parametrize("text", ["", "   \n"])
def test_empty_text_is_refused_with_a_message(tiny_adapter, noise_image, text):
    with pytest.raises(InputError, match="text is empty"):
        tiny_adapter.encode([noise_image], [text])


def test_prediction_is_a_softmax_top_k(tiny_adapter, noise_image):
    t = extract_trace(tiny_adapter, noise_image, "what is it?", "x", gold=["red"])
    probs = [p for _, p in t.prediction]
    assert len(t.prediction) == 5 and probs == sorted(probs, reverse=True)
    assert abs(sum(probs) - 1.0) < 1e-5  # all 5 labels of the tiny head
    assert t.correct == (t.predicted == "red")


def test_image_text_matching_head_gives_one_score(tiny_tokenizer_dir, noise_image):
    adapter = make_tiny_adapter(tiny_tokenizer_dir, arch="ViltForImageAndTextRetrieval")
    t = extract_trace(adapter, noise_image, "a cat", "x")
    assert len(t.prediction) == 1 and t.prediction[0][0] == "match" and 0 < t.prediction[0][1] < 1


def test_saved_checkpoint_loads_from_a_folder_with_weights_hash(tiny_adapter, tmp_path, noise_image):
    tiny_adapter.model.save_pretrained(tmp_path)
    tiny_adapter.tokenizer.save_pretrained(tmp_path)
    tiny_adapter.image_processor.save_pretrained(tmp_path)
    loaded = load_adapter(str(tmp_path), device="cpu")
    assert loaded.model_id.startswith(f"{tmp_path.name}@sha256:") and loaded.task == "vqa"
    a = extract_trace(tiny_adapter, noise_image, "what is it?", "x")
    b = extract_trace(loaded, noise_image, "what is it?", "x")
    assert np.array_equal(a.attentions, b.attentions)


def test_folder_without_processor_names_the_fix(tiny_adapter, tmp_path):
    tiny_adapter.model.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="processor"):
        load_adapter(str(tmp_path), device="cpu")


def test_non_vilt_checkpoint_lists_supported_architectures(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
               architectures=["BertModel"]).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="ViltForQuestionAnswering"):
        load_adapter(str(tmp_path))


def test_unreachable_hub_id_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="dandelin/vilt-b32-finetuned-vqa.*bundled demo"):
        load_adapter("dandelin/vilt-b32-finetuned-vqa")


def test_missing_local_folder_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_adapter("./no/such/model")


def test_masked_lm_head_predicts_tokens_at_the_mask(tiny_tokenizer_dir, noise_image):
    adapter = make_tiny_adapter(tiny_tokenizer_dir, arch="ViltForMaskedLM")
    t = extract_trace(adapter, noise_image, "what is the [MASK] of the cat?", "x")
    assert len(t.prediction) == 5 and all(isinstance(tok, str) for tok, _ in t.prediction)
    assert extract_trace(adapter, noise_image, "what is the cat?", "y").prediction == ()


def test_bare_vilt_model_has_attentions_and_no_prediction(tiny_tokenizer_dir, noise_image):
    adapter = make_tiny_adapter(tiny_tokenizer_dir, arch="ViltModel")
    t = extract_trace(adapter, noise_image, "a cat", "x")
    assert t.prediction == () and t.attentions.shape[:2] == (2, 2)


def test_a_model_returning_no_attentions_names_itself_and_the_fix(tiny_adapter, noise_image, monkeypatch):
    from transformers.modeling_outputs import SequenceClassifierOutput

    from vlcore.errors import NoAttentionError

    real = tiny_adapter.model.forward

    def no_attentions(**kwargs):
        out = real(**kwargs)
        return SequenceClassifierOutput(logits=out.logits, hidden_states=out.hidden_states, attentions=None)

    monkeypatch.setattr(tiny_adapter.model, "forward", no_attentions)
    with pytest.raises(NoAttentionError, match=r"tiny-ViltForQuestionAnswering@seed0 returned no attention.*eager"):
        extract_trace(tiny_adapter, noise_image, "what is it?", "x")


def test_answers_are_found_from_id2label_even_without_label2id(tiny_tokenizer_dir):
    import torch

    from tests.conftest import TINY_LABELS, make_tiny_adapter

    adapter = make_tiny_adapter(tiny_tokenizer_dir)
    adapter.model.config.label2id = {}  # some configs carry id2label only
    logits = torch.arange(len(TINY_LABELS), dtype=torch.float32)[None]
    assert adapter.label2id == {a: i for i, a in enumerate(TINY_LABELS)}
    assert float(adapter.target_score(logits, "circle")[0][0]) == TINY_LABELS.index("circle")
