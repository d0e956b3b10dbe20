"""Streamlit glue of the logit-lens page: the lens stored with a generative model's trace, the layer picker, the
rank and probability charts and the image tokens' words on the image (`vlcore.charts.logit_lens`)."""

from __future__ import annotations

import streamlit as st

from vlcore.charts.logit_lens import (
    build_image_lens_chart,
    build_lens_prob_chart,
    build_lens_rank_chart,
    image_lens_frame,
    layer_name,
    lens_frame,
)
from vlcore.models.generative import GENERATED, LM
from vlcore.trace import Trace
from vlcore.ui.export import chart_downloads
from vlcore.ui.state import get_int, set_params

NOT_GENERATIVE = ("The logit lens applies to generative models (decoders that write their answer token by "
                  "token); {model} does not generate. Pick a generative checkpoint in the sidebar.")
NO_LENS = ("This trace has no logit lens (it was stored without hidden states); run the example again on the "
           "**Run model** page.")


def lens_of(trace: Trace) -> dict | None:
    """The trace's logit lens (``trace.meta["lens"]``, see `vlcore.charts.logit_lens`), or None."""
    lens = trace.meta.get("lens") if isinstance(trace.meta, dict) else None
    return lens if lens and lens.get("rank") else None


def generated_tokens(trace: Trace) -> tuple[str, ...]:
    """The generated tokens, in the order of the lens' steps."""
    stream = trace.streams.get(GENERATED)
    return stream.tokens if stream is not None else ()


def pick_lens_layer(n_lens_layers: int) -> int:
    """Sidebar slider of the lens layer ``0 .. L`` (0: embeddings), carried in the URL's ``layer``."""
    last = n_lens_layers - 1
    layer = st.sidebar.select_slider("Layer (image tokens)", options=list(range(n_lens_layers)),
                                     value=get_int("layer", last, 0, last), key="lens_layer", format_func=layer_name)
    set_params(layer=layer)
    return int(layer)


def show_generated_lens(trace: Trace, lens: dict) -> None:
    """The rank heatmap and the probability lines of the generated tokens, with their downloads."""
    frame = lens_frame(lens, generated_tokens(trace))
    if frame.empty:
        st.info("The model generated no token for this example, so there is no lens to show.")
        return
    rank_chart = build_lens_rank_chart(frame)
    st.altair_chart(rank_chart, key="lens_rank")
    st.caption("Each cell: where the token the model finally produced at that step ranks among the whole vocabulary "
               "when that layer's hidden state is read through the final norm and the LM head (0 = top, log "
               "colour scale). Hover for the layer's top-5 tokens. A rank above 0 at the last layer means a token the model "
               "may not generate (an image placeholder) scored higher.")
    prob_chart = build_lens_prob_chart(frame)
    st.altair_chart(prob_chart, key="lens_prob")
    with st.expander("Downloads"):
        chart_downloads(rank_chart, "logit-lens-rank", "lens_rank_dl")
        chart_downloads(prob_chart, "logit-lens-prob", "lens_prob_dl")
        st.download_button("Lens table (CSV)", frame.to_csv(index=False), "logit-lens.csv", "text/csv",
                           key="lens_csv", on_click="ignore")


def show_image_lens(trace: Trace, lens: dict, layer: int) -> None:
    """The image with each image token's top vocabulary token at ``layer`` on its cell (one chart per image)."""
    layout = trace.streams.get(LM)
    if layout is None or not layout.images or not lens.get("image_positions"):
        st.info("This trace has no image tokens in the language model's sequence.")
        return
    for image in range(len(layout.images)):
        frame = image_lens_frame(layout, lens, layer, image)
        title = f"Image tokens' top token · {layer_name(layer)}" + (f" · image {image}" if len(layout.images) > 1 else "")
        st.altair_chart(build_image_lens_chart(layout, frame, image, title), key=f"lens_image_{image}")
    st.caption("Each image token's most likely vocabulary token when its hidden state at this layer is read through "
               "the final norm and the LM head; hover a cell for its top 3.")
