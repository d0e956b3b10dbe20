"""Forward hooks that act only inside the call that added them.

The app loads a model once and shares it with every session (`st.cache_resource`), and PyTorch keeps a
hook on the module: a hook added by one call runs in *every* forward pass through that module while it is
attached, including another session's plain pass in another thread at the same moment. That pass would
then run with someone else's heads masked, and a capturing hook would collect the other pass's tensors.

A lock would have to be taken by every pass through the model (also code that calls ``adapter.model``
directly) and would serialise the sessions. Instead, `scoped_forward_hooks` wraps each hook so that it
cannot leak:

- entering the block adds a fresh token to a `contextvars.ContextVar` (each thread and each asyncio task
  has its own value) and notes the current thread;
- the wrapper calls the hook only when the pass runs in that thread with that token in its context.
  Anywhere else it returns None, which PyTorch reads as "output unchanged": another call's forward
  passes through untouched and its outputs never reach the hook;
- the hooks are registered inside ``try`` and removed, and the token dropped, in ``finally``, so none
  survives an error, not even one raised while registering a later hook.

Only forward hooks are scoped: a model's forward hooks run in the thread that called the model, so the
hooked pass must run in the thread that opened the block (a pass handed to a worker thread would run
unhooked). Tensor hooks (``tensor.register_hook``) live on one call's own tensors and need no scope.
Nothing else in ``vlcore`` registers module hooks (``tests/models/test_hook_isolation.py`` checks).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

_ACTIVE: ContextVar[frozenset] = ContextVar("vlscope_hook_scopes", default=frozenset())


def hook_scope_active() -> bool:
    """Whether the current thread/context is inside a `scoped_forward_hooks` block."""
    return bool(_ACTIVE.get())


def _scoped(hook: Callable, token: object, thread: int) -> Callable:
    def wrapper(module: Any, args: Any, output: Any) -> Any:
        if threading.get_ident() != thread or token not in _ACTIVE.get():
            return None  # another call's pass: leave it alone
        return hook(module, args, output)

    return wrapper


@contextmanager
def scoped_forward_hooks(hooks: Iterable[tuple[Any, Callable]]) -> Iterator[None]:
    """Attach forward hooks that act only on forward passes run by this block's own thread and context.

    Args:
        hooks: ``(module, hook)`` pairs; each ``hook(module, args, output)`` is a PyTorch forward hook (it may
            return a replacement output).

    Example:
        >>> import torch
        >>> layer, seen = torch.nn.Identity(), []
        >>> with scoped_forward_hooks([(layer, lambda m, a, o: seen.append(o))]):
        ...     _ = layer(torch.ones(1))
        >>> _ = layer(torch.zeros(1))  # outside the block: not seen
        >>> [t.tolist() for t in seen]
        [[1.0]]
    """
    token, thread = object(), threading.get_ident()
    reset = _ACTIVE.set(_ACTIVE.get() | {token})
    handles = []
    try:
        for module, hook in hooks:
            handles.append(module.register_forward_hook(_scoped(hook, token, thread)))
        yield
    finally:
        for handle in handles:
            handle.remove()
        _ACTIVE.reset(reset)
