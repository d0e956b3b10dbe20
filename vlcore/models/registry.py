"""Load a model adapter from a hub id or a local directory.

Always eager attention, never ``trust_remote_code``; ``local_files_only`` when offline or when the Hub does not
answer a quick probe (`vlcore.models.hub`), so an unreachable Hub fails in seconds, not after half a minute of
retries. Load errors name their cause (`vlcore.models.hub.describe_load_error`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from vlcore.app_files import DEMO_MODEL_DIR  # in the checkout, or in the installed vlscope_app
from vlcore.errors import ModelLoadError, UnsupportedModelError
from vlcore.models.base import ModelAdapter
from vlcore.models.hub import describe_load_error, first_line, hub_unreachable, is_network_error, offline_variable

DEMO_MODEL = "demo"

# Offered in the UI; any other ViLT id or directory also works.
KNOWN_CHECKPOINTS = {
    "dandelin/vilt-b32-finetuned-vqa": "VQA (3,129 answers)",
    "dandelin/vilt-b32-mlm": "masked LM (pre-trained)",
    "dandelin/vilt-b32-finetuned-coco": "image-text matching (COCO)",
    "dandelin/vilt-b32-finetuned-flickr30k": "image-text matching (Flickr30k)",
    "dandelin/vilt-b32-finetuned-nlvr2": "NLVR2: is the sentence true of two images?",
}


def is_offline() -> bool:
    """True when the environment asks for no hub access (``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE`` or
    ``VLSCOPE_OFFLINE``)."""
    return offline_variable() is not None


def weights_hash(directory: Path) -> str:
    """First 12 hex digits of the sha256 over a local checkpoint's weights, config and processor files."""
    digest = hashlib.sha256()
    files = sorted(p for p in directory.iterdir() if p.is_file() and (p.suffix in (".safetensors", ".bin") or p.name in (
        "config.json", "preprocessor_config.json", "processor_config.json", "tokenizer.json",
        "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")))
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()[:12]


def resolve_source(source: str) -> tuple[str, bool]:
    """Map "demo" to the bundled checkpoint; return (source, is_local_dir)."""
    if source in (DEMO_MODEL, "", None):
        return str(DEMO_MODEL_DIR), True
    path = Path(source).expanduser()
    if path.is_dir():
        return str(path), True
    if path.exists() or source.startswith((".", "/", "~")):
        raise ModelLoadError(f"model directory {source!r} does not exist or is not a directory; give a checkpoint folder or a hub id")
    return source, False


def load_adapter(source: str = DEMO_MODEL, revision: str | None = None, device: str = "auto", dtype=None) -> ModelAdapter:
    """Load a model and its processor behind the adapter for its family.

    Args:
        source: "demo", a local checkpoint directory, or a hub id like ``dandelin/vilt-b32-finetuned-vqa``.
        revision: hub revision (branch, tag or commit); ignored for local directories.
        device: "auto", "cpu" or "cuda".
        dtype: torch dtype of the weights (default float32).

    A hub id is loaded from the hub cache only (``local_files_only``) when hub access is switched off or the Hub
    does not answer a quick, cached probe (`vlcore.models.hub.hub_unreachable`).

    Raises:
        UnsupportedModelError: the checkpoint is not a supported architecture.
        ModelLoadError: the checkpoint or its processor cannot be loaded; the message names the cause (no network,
            no such model or revision, a missing or damaged file, ...).
    """
    from transformers import AutoConfig

    path, local = resolve_source(source)
    if local and not (Path(path) / "config.json").is_file():
        raise ModelLoadError(f"the folder {source!r} has no config.json, so it is not a saved checkpoint; give the "
                             "folder save_pretrained wrote (config.json and model.safetensors), or a hub id.")
    unreachable = None if local or is_offline() else hub_unreachable()
    offline = local or is_offline() or unreachable is not None
    kwargs = {"revision": revision, "local_files_only": offline, "trust_remote_code": False}
    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
    except Exception as exc:  # transformers raises OSError/ValueError/HTTP errors: name the cause
        raise describe_load_error(source, local, exc, revision, unreachable) from exc
    archs = list(getattr(config, "architectures", None) or [])
    if config.model_type == "vilt":
        return _load_vilt(path, local, config, archs, kwargs, source, revision, device, dtype, unreachable)
    raise UnsupportedModelError(
        f"{source!r} is a {config.model_type!r} model ({', '.join(archs) or 'no architecture'}); VLScope supports "
        "ViLT checkpoints (ViltForQuestionAnswering, ViltForImageAndTextRetrieval, ViltForMaskedLM, ViltModel, "
        "ViltForImagesAndTextClassification). "
        "Try dandelin/vilt-b32-finetuned-vqa or the bundled demo."
    )


def _load_vilt(path, local, config, archs, kwargs, source, revision, device, dtype, unreachable) -> ModelAdapter:
    import transformers
    from transformers import AutoTokenizer, ViltImageProcessorPil

    from vlcore.models.vilt import ARCHITECTURES, ViltAdapter

    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise UnsupportedModelError(
            f"{source!r} is ViLT but its head {archs or '(none)'} is not supported; supported heads: "
            f"{', '.join(ARCHITECTURES)}."
        )
    try:
        model = getattr(transformers, arch).from_pretrained(path, attn_implementation="eager", **kwargs)
    except Exception as exc:
        raise describe_load_error(source, local, exc, revision, unreachable) from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        image_processor = ViltImageProcessorPil.from_pretrained(path, **kwargs)
    except Exception as exc:
        if is_network_error(exc):
            raise describe_load_error(source, local, exc, revision, unreachable) from exc
        raise ModelLoadError(
            f"{source!r} has weights but its processor (tokenizer or preprocessor_config.json) could not be "
            f"loaded ({first_line(exc)}). Save the processor beside the weights "
            "(ViltProcessor.save_pretrained) or use a checkpoint that ships one."
        ) from exc
    if local:
        model_id = f"{Path(path).name}@sha256:{weights_hash(Path(path))}"
    else:
        model_id = f"{source}@{_hub_commit(path, revision) or revision or 'main'}"
    return ViltAdapter(model, tokenizer, image_processor, model_id=model_id, device=device, dtype=dtype)


def _hub_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit a loaded hub checkpoint came from: the name of its hub-cache snapshot folder (transformers 5 no
    longer sets ``config._commit_hash``). None when it cannot be told."""
    from transformers.utils import cached_file

    try:
        resolved = cached_file(repo_id, "config.json", revision=revision, local_files_only=True)
    except Exception:  # not in the cache layout we know: fall back to the revision name
        return None
    folder = Path(resolved).parent if resolved else None
    return folder.name if folder is not None and folder.parent.name == "snapshots" else None
