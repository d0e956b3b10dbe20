"""VLScope core: UI-free computation for interpreting vision-language transformers."""

from __future__ import annotations

__version__ = "0.1.0"
