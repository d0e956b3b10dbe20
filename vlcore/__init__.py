"""VLScope core: UI-free computation for interpreting vision-language transformers.

In a notebook, use `vlcore.notebook` (its docstring lists the public API)::

    import vlcore.notebook as vn

    trace = vn.run(example="easy_vqa/test/0")         # or vn.run(image="cat.png", text="what is it?")
    vn.heatmap(trace, query="shape")                  # and vn.head_summary, vn.matrix, vn.projection

``vlcore.notebook`` is imported on first use, so ``import vlcore`` stays light (no torch, no Altair).
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__", "notebook"]


def __getattr__(name: str):
    if name == "notebook":
        import importlib

        return importlib.import_module("vlcore.notebook")
    raise AttributeError(f"module 'vlcore' has no attribute {name!r}")
