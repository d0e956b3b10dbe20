"""Errors a user can trigger. Each message says what was expected, what came, and the fix."""

from __future__ import annotations


class VLScopeError(Exception):
    """Base class for every error VLScope shows to a user instead of a traceback."""


class ModelLoadError(VLScopeError):
    """A model or its processor could not be loaded."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint is not an architecture VLScope has an adapter for."""


class NoAttentionError(VLScopeError):
    """The model returned no attention weights."""


class InputError(VLScopeError):
    """An image or text input is unusable."""


class DatasetError(VLScopeError):
    """A dataset could not be found, loaded or mapped."""


class StoreError(VLScopeError):
    """The result store could not read or write an entry."""


class AnnotationError(InputError):
    """An annotation could not be saved or read (empty name, unknown label, bad label configuration)."""


class DeviceMemoryError(VLScopeError):
    """The model ran out of memory on its device (GPU or CPU) even at the smallest batch."""
