"""A user's own inputs (an uploaded image and its text), kept in the store under ``inputs/<hash>``.

The id is a content hash, so the same upload always gets the same id and a link to it can be shared.
"""

from __future__ import annotations

import json
from pathlib import Path

from vlcore.errors import InputError
from vlcore.storage.store import Store, atomic_write_bytes


def _input_paths(root: Path, input_id: str) -> tuple[Path, Path]:
    digest = input_id.removeprefix("upload/")
    if not digest or not all(c in "0123456789abcdef" for c in digest):
        raise ValueError(f"not an upload id: {input_id!r}")
    base = root / "inputs" / digest
    return base.with_suffix(".png"), base.with_suffix(".json")


def put_input(store: Store, image, text: str, extra_images: tuple = ()) -> str:
    """Keep a user's image(s) and text in the store; returns its id ``upload/<16 hex>``.

    The id is a content hash of every image and the text, so the same upload always gets the same
    id and can be shared. ``extra_images`` holds further images (NLVR2's second image).
    """
    import io

    from vlcore.data.example import content_hash

    digest = content_hash(image, text)
    for extra in extra_images:
        digest = content_hash(extra, digest)
    input_id = f"upload/{digest[:16]}"
    png, meta = _input_paths(store.root, input_id)
    if not (png.exists() and meta.exists()):
        from vlcore.data.example import image_notes

        notes = [n for im in (image, *extra_images) for n in image_notes(im)]
        info = {"text": text, "n_images": 1 + len(extra_images), "image_notes": notes}
        atomic_write_bytes(meta, json.dumps(info).encode())
        for i, im in enumerate((image, *extra_images)):
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            atomic_write_bytes(png if i == 0 else png.with_name(f"{png.stem}-{i}.png"), buf.getvalue())
    return input_id


def get_input(store: Store, input_id: str):
    """The stored user example as an `Example`, or None when the id is unknown or malformed."""
    from vlcore.data.example import Example, open_image

    try:
        png, meta = _input_paths(store.root, input_id)
        info = json.loads(meta.read_text())
        extras = tuple(open_image(png.with_name(f"{png.stem}-{i}.png")) for i in range(1, info.get("n_images", 1)))
        return Example(input_id, info["text"], image=open_image(png), source="upload", extra_images=extras,
                       meta={"image_notes": list(info.get("image_notes", []))})
    except (ValueError, OSError, KeyError, InputError):
        return None
