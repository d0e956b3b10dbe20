"""Hub access for model loading: offline detection, a fast reachability probe, and load errors that say what failed.

**Failing fast.** With no network, ``from_pretrained`` on a hub id retries its first request five times with
back-off (1 + 2 + 4 + 8 + 8 s) before it gives up: about 25 s before the user sees an error. `hub_unreachable`
first sends one HEAD request to the Hub endpoint through huggingface_hub's own HTTP session (so ``HF_ENDPOINT``
and proxy settings apply), in a worker thread bounded by `PROBE_TIMEOUT_S` (a DNS lookup ignores socket
timeouts). When nothing answers, `vlcore.models.registry.load_adapter` loads with ``local_files_only=True``: a
checkpoint already in the hub cache still loads, and any other fails at once. The answer is kept for
`PROBE_TTL_S`, so a page that loads several things probes once.

**Saying what failed.** `describe_load_error` walks an exception's chain (transformers wraps hub errors in
``OSError``) and names the cause in one line: no network, no such repository, a gated one, no such revision, a
missing weights file, a damaged safetensors file, a config.json that is not JSON, a model type transformers does
not know, weights that do not fit the config, or else the exception itself.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

from vlcore.errors import ModelLoadError, UnsupportedModelError

PROBE_TIMEOUT_S = 2.0
PROBE_TTL_S = 30.0
OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "VLSCOPE_OFFLINE")
SUPPORTED = ("ViLT checkpoints (ViltForQuestionAnswering, ViltForImageAndTextRetrieval, ViltForMaskedLM, ViltModel, "
             "ViltForImagesAndTextClassification)")

# Exception classes (by name, anywhere in an exception's MRO) that mean "no network": requests, httpx and
# huggingface_hub name them so, and this avoids importing each HTTP library.
_NETWORK_CLASSES = frozenset({
    "ConnectionError", "ConnectError", "ConnectTimeout", "Timeout", "TimeoutException", "TimeoutError",
    "NetworkError", "TransportError", "ProxyError", "OfflineModeIsEnabled", "LocalEntryNotFoundError", "gaierror",
})

_probe_cache: dict[str, tuple[float, str | None]] = {}
_probe_lock = threading.Lock()


def offline_variable() -> str | None:
    """The environment variable that turns hub access off (``HF_HUB_OFFLINE`` and friends), or None."""
    return next((v for v in OFFLINE_VARS if os.environ.get(v, "").lower() in ("1", "true", "yes", "on")), None)


def hub_endpoint() -> str:
    """The Hub's base URL (``HF_ENDPOINT`` or https://huggingface.co)."""
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def _probe_hub(endpoint: str, timeout: float) -> None:
    """One HEAD request to the endpoint; raises when nothing answers (any HTTP status is an answer)."""
    from huggingface_hub import get_session

    get_session().head(endpoint, timeout=timeout, follow_redirects=False)


def hub_unreachable(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the Hub cannot be reached now, or None when it answers. Cached for `PROBE_TTL_S` seconds.

    Args:
        timeout: seconds to wait for an answer, DNS lookup included.

    Returns:
        None, or a short reason such as ``"ConnectError: [Errno -2] Name or service not known"``.
    """
    endpoint = hub_endpoint()
    with _probe_lock:
        cached = _probe_cache.get(endpoint)
        if cached is not None and time.monotonic() - cached[0] < PROBE_TTL_S:
            return cached[1]
        outcome: list[str | None] = []

        def probe() -> None:
            try:
                _probe_hub(endpoint, timeout)
                outcome.append(None)
            except Exception as exc:  # any failure to get an answer means "unreachable"; say which
                outcome.append(first_line(exc))

        worker = threading.Thread(target=probe, name="vlscope-hub-probe", daemon=True)
        worker.start()
        worker.join(timeout + 0.5)
        reason = outcome[0] if outcome else f"no answer within {timeout:g} s"
        _probe_cache[endpoint] = (time.monotonic(), reason)
        return reason


def forget_probe() -> None:
    """Drop the cached probe answer (the next load probes again)."""
    with _probe_lock:
        _probe_cache.clear()


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while exc is not None and len(seen) < 20 and all(exc is not s for s in seen):
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def _named(exc: BaseException, names) -> bool:
    return any(cls.__name__ in names for cls in type(exc).__mro__)


def first_line(exc: BaseException, limit: int = 160) -> str:
    """``"Type: first line of the message"``, cut to ``limit`` characters (load errors stay one line)."""
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def is_network_error(exc: BaseException) -> bool:
    """Whether an exception (or one in its chain) means the Hub could not be reached."""
    for e in _chain(exc):
        if _named(e, _NETWORK_CLASSES) or isinstance(e, (ConnectionError, TimeoutError, socket.gaierror)):
            return True
        if isinstance(e, OSError) and "couldn't connect to" in str(e):
            return True
    return False


def describe_load_error(
    source: str, local: bool, exc: BaseException, revision: str | None = None, unreachable: str | None = None
) -> ModelLoadError:
    """A one-line `ModelLoadError` (or `UnsupportedModelError`) naming why loading ``source`` failed.

    Args:
        source: what the user asked for (hub id, folder, or "demo").
        local: whether ``source`` is a local folder.
        exc: what transformers / huggingface_hub raised.
        revision: the hub revision asked for.
        unreachable: the probe's reason when the Hub did not answer (the load then ran from the cache only).
    """
    chain = _chain(exc)
    names = {cls.__name__ for e in chain for cls in type(e).__mro__}
    text = " ".join(str(e) for e in chain)
    detail = first_line(exc)
    where = f"the folder {source!r}" if local else f"{source!r}"
    if not local and is_network_error(exc):
        return ModelLoadError(_network_message(source, unreachable or detail))
    if "GatedRepoError" in names:
        return ModelLoadError(f"{source!r} is a gated model: accept its terms on {hub_endpoint()}/{source} and log in "
                              "with `hf auth login`, then load it again.")
    if "RepositoryNotFoundError" in names:
        return ModelLoadError(f"{source!r} is not a model on the Hugging Face Hub (or it is private): check the id, "
                              "e.g. dandelin/vilt-b32-finetuned-vqa, or log in with `hf auth login` for a private one.")
    if "RevisionNotFoundError" in names:
        return ModelLoadError(f"{source!r} has no revision {revision!r}: give a branch, tag or commit it has, or "
                              "leave the revision empty for main.")
    if "SafetensorError" in names or "deserializing header" in text:
        return ModelLoadError(f"the weights file of {where} is damaged ({detail}): it is not a valid safetensors "
                              "file. Save the checkpoint again with save_pretrained, or delete it from the hub cache "
                              "to download it again.")
    if any(isinstance(e, json.JSONDecodeError) for e in chain) or "not a valid JSON file" in text:
        return ModelLoadError(f"the config.json of {where} is not valid JSON ({detail}); save the checkpoint again "
                              "with save_pretrained.")
    if "does not recognize this architecture" in text or "Unrecognized model" in text:
        return UnsupportedModelError(f"{where} is not a model type transformers knows ({detail}); VLScope supports "
                                     f"{SUPPORTED}.")
    if "size mismatch" in text or "ignore_mismatched_sizes" in text:
        return ModelLoadError(f"the weights of {where} do not fit its config.json (tensor sizes differ); use the "
                              "config.json the weights were saved with.")
    if ("EntryNotFoundError" in names or "does not appear to have" in text or "no file named" in text):
        return ModelLoadError(f"{where} is missing a file ({detail}); it needs config.json and model.safetensors "
                              "as written by save_pretrained.")
    if "HfHubHTTPError" in names:
        return ModelLoadError(f"the Hugging Face Hub answered with an error for {source!r} ({detail}); try again "
                              "later, or use the bundled demo model.")
    hint = (" The folder needs config.json and model.safetensors, as written by save_pretrained." if local
            else " Check the id, or use the bundled demo model.")
    return ModelLoadError(f"could not load {where}: {detail}.{hint}")


def _network_message(source: str, reason: str) -> str:
    var = offline_variable()
    if var is not None:
        return (f"could not load {source!r}: hub access is off ({var} is set) and it is not in the local hub cache. "
                f"Unset {var} and connect to the network to download it, or use the bundled demo model.")
    return (f"could not load {source!r}: the Hugging Face Hub ({hub_endpoint()}) could not be reached ({reason}) "
            "and it is not in the local hub cache. Connect to the network and try again, or use the bundled demo "
            "model.")
