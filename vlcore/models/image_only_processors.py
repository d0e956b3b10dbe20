"""Processors of video-capable VLM families, built without their video processor.

``Qwen2VLProcessor``, ``Qwen2_5_VLProcessor`` and ``LlavaOnevisionProcessor`` take a video processor as a third
part, and transformers checks that part's class; every video processor needs torchvision, whose wheels do not
load beside the CPU torch used here. VLScope feeds these models images only, so `image_only_processor_class`
gives the family's own processor class minus the video part: the same ``__init__`` (image token, its id, chat
template), the same ``replace_image_token`` expansion and ``__call__``; ``videos=`` is then ignored.
(``SmolVLMProcessor``, SmolVLM2's, also needs ``num2words``: not covered; SmolVLM v1 checkpoints ship
``Idefics3Processor``, which needs neither.)

It works because ``ProcessorMixin`` reads a processor's parts from its ``__init__`` signature: the subclass's
signature lists ``image_processor`` and ``tokenizer`` only, and the parent's ``super().__init__(image_processor,
tokenizer, video_processor, ...)`` call then sets just those two (tested in ``tests/models/test_image_tokens.py``).
"""

from __future__ import annotations

import functools
import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path

from vlcore.errors import ModelLoadError

QWEN_PROCESSORS = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}
# model type -> the processor class that takes a video processor beside the image processor
VIDEO_PROCESSORS = {**QWEN_PROCESSORS, "llava_onevision": "LlavaOnevisionProcessor"}


def torchvision_available() -> bool:
    """True when torchvision imports (then the stock processors load)."""
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision  # noqa: F401
    except (ImportError, OSError, RuntimeError):  # a wheel built for another torch fails at import
        return False
    return True


@functools.cache
def image_only_processor_class(processor_cls: type) -> type:
    """``processor_cls`` without its ``video_processor`` part.

    Args:
        processor_cls: a ``ProcessorMixin`` subclass whose ``__init__`` takes ``(image_processor, tokenizer,
            video_processor, ...)``.

    Returns:
        A subclass whose ``__init__(image_processor, tokenizer, **kwargs)`` calls the parent's with no video part.
    """

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        processor_cls.__init__(self, image_processor, tokenizer, None, **kwargs)

    return type(f"{processor_cls.__name__}ImageOnly", (processor_cls,), {"__init__": __init__,
                                                                        "__module__": __name__})


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _chat_template(folder: Path, tokenizer) -> str | None:
    """The processor's chat template as ``save_pretrained`` writes it (jinja file, json file or processor
    config), else the tokenizer's."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    for name in ("chat_template.json", "processor_config.json"):
        template = _read_json(folder / name).get("chat_template")
        if template:
            return template
    return getattr(tokenizer, "chat_template", None)


def _processor_class(folder: Path) -> str | None:
    """The folder's processor class name: its processor config, else its model type's."""
    for name in ("processor_config.json", "preprocessor_config.json"):
        cls = _read_json(folder / name).get("processor_class")
        if cls in VIDEO_PROCESSORS.values():
            return cls
    return VIDEO_PROCESSORS.get(_read_json(folder / "config.json").get("model_type"))


def _processor_kwargs(folder: Path, cls: type) -> dict:
    """The processor settings the folder's processor config holds that ``cls.__init__`` takes (e.g. OneVision's
    ``num_image_tokens``, ``vision_feature_select_strategy``, ``vision_aspect_ratio``)."""
    import inspect

    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "image_processor", "tokenizer",
                                                                 "video_processor", "chat_template", "kwargs"}
    settings = _read_json(folder / "processor_config.json")
    return {k: v for k, v in settings.items() if k in accepted}


def build_image_only_processor(folder_or_parts, processor_class: str | None = None):
    """The processor of a family whose stock processor needs a video processor (`VIDEO_PROCESSORS`), with or
    without torchvision.

    With torchvision the stock ``AutoProcessor`` loads a folder. Without it the processor is the family's own
    class minus its video part (`image_only_processor_class`), built from the folder's tokenizer, image
    processor (the PIL one), chat template and processor settings.

    Args:
        folder_or_parts: a checkpoint folder, or a mapping with ``tokenizer``, ``image_processor`` and optionally
            ``chat_template`` and the processor's settings.
        processor_class: a name in `VIDEO_PROCESSORS` values; default: the folder's (parts: required).

    Returns:
        A processor whose ``__call__`` and ``apply_chat_template`` expand image placeholders as the stock one does.

    Raises:
        ModelLoadError: the folder has no tokenizer or image processor, or the processor class is not one of
            `VIDEO_PROCESSORS`.
    """
    import transformers

    if isinstance(folder_or_parts, Mapping):
        parts, folder = dict(folder_or_parts), None
    else:
        folder = Path(folder_or_parts)
        if torchvision_available():
            return transformers.AutoProcessor.from_pretrained(folder)
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
            image_processor = transformers.AutoImageProcessor.from_pretrained(folder)
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"could not read a tokenizer and an image processor from {folder}: {err}. "
                                 "The folder needs tokenizer files and preprocessor_config.json.") from err
        parts = {"tokenizer": tokenizer, "image_processor": image_processor,
                 "chat_template": _chat_template(folder, tokenizer)}
    processor_class = processor_class or (_processor_class(folder) if folder is not None else None)
    if processor_class not in VIDEO_PROCESSORS.values():
        raise ModelLoadError(f"processor class {processor_class!r} is not one VLScope builds without its video "
                             f"processor; expected one of {sorted(VIDEO_PROCESSORS.values())}.")
    cls = getattr(transformers, processor_class)
    settings = {k: v for k, v in parts.items() if k not in ("tokenizer", "image_processor")}
    if folder is not None:
        settings.update(_processor_kwargs(folder, cls))
    return image_only_processor_class(cls)(image_processor=parts["image_processor"], tokenizer=parts["tokenizer"],
                                           **settings)


def build_qwen2_vl_processor(folder_or_parts, model_type: str | None = None):
    """A Qwen2-VL or Qwen2.5-VL processor, with or without torchvision (`build_image_only_processor`).

    Args:
        folder_or_parts: a checkpoint folder, or a mapping with ``tokenizer``, ``image_processor`` and optionally
            ``chat_template``.
        model_type: ``qwen2_vl`` or ``qwen2_5_vl``; default: the folder's processor class or config (parts:
            ``qwen2_vl``; both expand image tokens alike).

    Returns:
        A processor whose ``__call__`` and ``apply_chat_template`` expand ``<|image_pad|>`` as the stock one does.

    Raises:
        ModelLoadError: the folder has no tokenizer or image processor, or ``model_type`` is not a Qwen one.
    """
    if model_type is not None and model_type not in QWEN_PROCESSORS:
        raise ModelLoadError(f"model_type {model_type!r} is not a Qwen VL type; expected one of "
                             f"{sorted(QWEN_PROCESSORS)}.")
    if model_type is None and isinstance(folder_or_parts, Mapping):
        model_type = "qwen2_vl"
    return build_image_only_processor(folder_or_parts, QWEN_PROCESSORS.get(model_type))
