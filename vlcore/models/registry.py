"""Load a model adapter from a hub id or a local directory.

Always eager attention, never ``trust_remote_code``; ``local_files_only`` when offline or when the Hub does not
answer a quick probe (`vlcore.models.hub`), so an unreachable Hub fails in seconds, not after half a minute of
retries. Load errors name their cause (`vlcore.models.hub.describe_load_error`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any

from vlcore.app_files import DEMO_MODEL_DIR, GENERATIVE_DEMO_DIR  # in the checkout, or the installed vlscope_app
from vlcore.errors import ModelLoadError, UnsupportedModelError
from vlcore.models.base import ModelAdapter
from vlcore.models.hub import describe_load_error, first_line, hub_unreachable, is_network_error, offline_variable

DEMO_MODEL = "demo"
GENERATIVE_DEMO = "demo-generative"  # the bundled LLaVA-architecture model trained on easy-VQA
DEMOS = {DEMO_MODEL: DEMO_MODEL_DIR, GENERATIVE_DEMO: GENERATIVE_DEMO_DIR}
# the model picker's labels
DEMO_LABELS = {DEMO_MODEL: "Bundled demo (ViLT)", GENERATIVE_DEMO: "Bundled demo (generative)"}
DEFAULT_HUB_CHECKPOINT = "dandelin/vilt-b32-finetuned-vqa"  # preselected when a user picks a hub checkpoint

# The family modules under vlcore.models; each defines FAMILY (a `Family`) and ``load(LoadContext)``.
FAMILY_MODULES = ("vilt", "blip", "clip", "llava", "qwen2_vl", "idefics3", "llava_next", "paligemma", "gemma3")


@dataclass(frozen=True)
class Family:
    """What a family module declares about itself.

    Attributes:
        name: short name, e.g. ``"blip"``.
        title: for display, e.g. ``"BLIP"``.
        model_types: the ``config.json`` ``model_type`` values it loads.
        architectures: supported ``architectures`` class names -> task.
        checkpoints: hub ids offered in the UI -> a few words on each.
    """

    name: str
    title: str
    model_types: tuple[str, ...]
    architectures: dict[str, str]
    checkpoints: dict[str, str]

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.architectures.values()))


def families() -> list[Family]:
    """Every supported family, in display order."""
    return [import_module(f"vlcore.models.{name}").FAMILY for name in FAMILY_MODULES]


def family_of(model_type: str) -> Family | None:
    """The family that loads ``model_type``, or None."""
    return next((f for f in families() if model_type in f.model_types), None)


def known_checkpoints() -> dict[str, tuple[Family, str]]:
    """Hub id -> (family, description), every family's offered checkpoints in display order."""
    return {hub_id: (fam, text) for fam in families() for hub_id, text in fam.checkpoints.items()}


def supported_text() -> str:
    """One line naming the supported families and their architectures."""
    return "; ".join(f"{f.title} ({', '.join(f.architectures)})" for f in families())


def is_offline() -> bool:
    """True when the environment asks for no hub access (``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE`` or
    ``VLSCOPE_OFFLINE``)."""
    return offline_variable() is not None


def weights_hash(directory: Path) -> str:
    """First 12 hex digits of the sha256 over a local checkpoint's weights, config and processor files."""
    digest = hashlib.sha256()
    files = sorted(p for p in directory.iterdir() if p.is_file() and (p.suffix in (".safetensors", ".bin") or p.name in (
        "config.json", "preprocessor_config.json", "processor_config.json", "tokenizer.json",
        "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "special_tokens_map.json",
        "chat_template.jinja", "chat_template.json", "generation_config.json")))
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()[:12]


def resolve_source(source: str) -> tuple[str, bool]:
    """Map "demo" / "demo-generative" to the bundled checkpoints; return (source, is_local_dir).

    Raises:
        ModelLoadError: a bundled demo missing from this checkout, or a folder that does not exist.
    """
    if source in ("", None):
        source = DEMO_MODEL
    if source in DEMOS:
        folder = DEMOS[source]
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"the bundled model {source!r} is not in this checkout ({folder} has no config.json); "
                                 "train it with scripts/train_demo_lvlm.py or pick the other demo")
        return str(folder), True
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
    family = family_of(config.model_type)
    if family is None:
        raise UnsupportedModelError(
            f"{source!r} is a {config.model_type!r} model ({', '.join(archs) or 'no architecture'}); VLScope supports "
            f"{supported_text()}. Try one of the offered checkpoints or the bundled demo."
        )
    arch = next((a for a in archs if a in family.architectures), None)
    if arch is None:
        raise UnsupportedModelError(
            f"{source!r} is {family.title} but its head {archs or '(none)'} is not supported; supported heads: "
            f"{', '.join(family.architectures)}."
        )
    ctx = LoadContext(path, local, config, arch, kwargs, source, revision, device, dtype, unreachable)
    return import_module(f"vlcore.models.{family.name}").load(ctx)


@dataclass
class LoadContext:
    """Everything a family's ``load`` needs, and the shared ways to load weights and processors with errors
    that name their cause."""

    path: str
    local: bool
    config: Any
    architecture: str
    kwargs: dict
    source: str
    revision: str | None
    device: str
    dtype: Any
    unreachable: str | None

    def from_pretrained(self, loader, **extra):
        """``loader.from_pretrained(path, ...)`` for the weights (eager attention); load errors named.

        Raises:
            ModelLoadError: the weights cannot be loaded (the message names the cause).
        """
        try:
            return loader.from_pretrained(self.path, **{**self.kwargs, **extra})
        except Exception as exc:
            raise describe_load_error(self.source, self.local, exc, self.revision, self.unreachable) from exc

    def processor(self, loader, **extra):
        """``loader.from_pretrained(path, ...)`` for a tokenizer or processor; a missing processor named as such.

        Raises:
            ModelLoadError: the processor files are missing or damaged, or the hub cannot be reached.
        """
        try:
            return loader.from_pretrained(self.path, **{**self.kwargs, **extra})
        except Exception as exc:
            if is_network_error(exc):
                raise describe_load_error(self.source, self.local, exc, self.revision, self.unreachable) from exc
            raise ModelLoadError(
                f"{self.source!r} has weights but its processor (tokenizer or preprocessor_config.json) could not "
                f"be loaded ({first_line(exc)}). Save the processor beside the weights (processor.save_pretrained) "
                "or use a checkpoint that ships one."
            ) from exc

    @property
    def model_id(self) -> str:
        """Name plus weights hash (local folder) or hub commit."""
        if self.local:
            return f"{Path(self.path).name}@sha256:{weights_hash(Path(self.path))}"
        return f"{self.source}@{_hub_commit(self.path, self.revision) or self.revision or 'main'}"


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
