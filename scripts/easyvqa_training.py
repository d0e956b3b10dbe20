"""Training helpers shared by the easy-VQA demo scripts (`train_demo_model.py`, `train_demo_lvlm.py`)."""

from __future__ import annotations

import torch


def tie_colour_blind(weight: torch.Tensor, share: float, scale: float, noise: float, gen: torch.Generator) -> None:
    """Start most patch filters colour-blind: one zero-mean spatial pattern on R, G and B alike (in place).

    easy-VQA draws one solid shape of 8 colours on a light, tinted background. With the
    default random init, a patch's embedding mixes its geometry with its colours (the mask
    times a colour-dependent weight per channel), and the model takes thousands of steps to
    untangle "which shape" from "which colour": shape accuracy sat near 0.6 for the whole run.
    Giving a `share` of the output channels the same zero-mean spatial filter on every input
    channel makes them respond to the shape's outline, whatever its colour, and ignore flat
    background; the remaining channels keep the random init and carry colour. `noise` times a
    fresh random init is added so the tied channels can still learn colour-specific detail.
    On shape questions alone (400 steps, seed 0) this lifted the ViLT demo's test shape
    accuracy from 0.57 to 0.78.

    Args:
        weight: a patch-embedding convolution's weight, ``[d_model, 3, patch, patch]``.
        share: fraction of the ``d_model`` output channels to tie (the first ones).
        scale: factor on the shared spatial filter.
        noise: factor on the fresh random init added to the tied channels.
        gen: the random generator for that init.
    """
    n = int(share * weight.shape[0])
    with torch.no_grad():
        spatial = weight[:n, :1] - weight[:n, :1].mean(dim=(2, 3), keepdim=True)
        jitter = torch.randn(weight[:n].shape, generator=gen) * weight.std()
        weight[:n] = spatial.expand(-1, weight.shape[1], -1, -1) * scale + noise * jitter
