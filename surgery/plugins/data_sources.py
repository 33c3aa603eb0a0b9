"""Built-in data sources: jsonl, preference, stdlib-text, image-text.

- ``jsonl``: one JSON object per line, ``{"text": ...}`` or ``{"prompt": ..., "answer": ...}``
  (then ``text`` = prompt + answer, joined as written: put any separator in the prompt or answer).
- ``preference``: ``{"prompt", "chosen", "rejected"}`` per line (``text`` = prompt + chosen).
- ``stdlib-text``: natural English from the Python standard library's documentation
  (``pydoc_data.topics``), cut into passages of ``words`` words; needs no file. Passages are cut in
  topic order, then shuffled with the data seed (``shuffle: false`` keeps topic order). The text is
  that of the running Python version. ``part: a`` / ``part: b`` keep only the even / odd topics (in
  sorted order), two disjoint halves: attribute on one, judge on the other.
- ``stdlib-pairs``: (first sentence, rest of the paragraph) pairs of the documentation's prose
  paragraphs (``part``: a, b or all topics, default a; ``min_words``), as two consecutive examples
  each (query, then document), pairs shuffled with the data seed: for a contrastive objective.
  Keep ``max_samples`` and ``batch_size`` even.
- ``image-text``: ``{"image": "cat.png", "text": ...}`` per line; the image path is relative to the
  JSONL file. PNG/JPEG need Pillow and give [3, H, W] in [0, 1]; ``.npy`` (loaded without pickle)
  and ``.safetensors`` (one tensor, or the one named ``pixel_values``) hold a [C, H, W] array as is.
  ``size: N`` resizes every image to N x N (bilinear). For LLaVA models, put the model's image
  tokens in ``text`` yourself.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from surgery import hookimpl
from surgery.core.errors import DataError
from surgery.core.options import Options
from surgery.models.data import DataSpec, read_jsonl, require_path, string_field
from surgery.core.lazy import lazy
from surgery.models.stdlib_text import paragraph_pairs, stdlib_passages

if TYPE_CHECKING:
    import torch
else:
    torch = lazy("torch")  # imported on first use: validating a recipe needs no torch

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


class StdlibTextOptions(Options):
    words: int = Field(64, ge=4, le=4096, description="words per passage")
    shuffle: bool = Field(True, description="shuffle passages with the data seed")
    part: Literal["all", "a", "b"] = Field("all", description="all topics, or the even (a) / odd (b) half of them")


class StdlibPairsOptions(Options):
    part: Literal["all", "a", "b"] = Field("a", description="all topics, or the even (a) / odd (b) half of them")
    min_words: int = Field(30, ge=4, description="shortest paragraph used")
    shuffle: bool = Field(True, description="shuffle the pairs with the data seed")


class ImageTextOptions(Options):
    size: int | None = Field(None, ge=1, description="resize every image to size x size")


@hookimpl
def register_data_sources(register):
    register("jsonl", load_jsonl)
    register("preference", load_preference)
    register("stdlib-text", load_stdlib_text, StdlibTextOptions)
    register("stdlib-pairs", load_stdlib_pairs, StdlibPairsOptions)
    register("image-text", load_image_text, ImageTextOptions)


# --- jsonl and preference ---------------------------------------------------------------------

def load_jsonl(spec: DataSpec, seed: int) -> list[dict]:
    path = require_path(spec)
    examples = []
    for lineno, record in read_jsonl(path):
        where = f"{path}:{lineno}"
        if "prompt" in record or "answer" in record:
            prompt, answer = string_field(record, "prompt", where), string_field(record, "answer", where)
            examples.append({"prompt": prompt, "answer": answer, "text": prompt + answer})
        elif "text" in record:
            examples.append({"text": string_field(record, "text", where)})
        else:
            raise DataError("missing field 'text' (or 'prompt' and 'answer')", where=where)
    return examples


def load_preference(spec: DataSpec, seed: int) -> list[dict]:
    path = require_path(spec)
    examples = []
    for lineno, record in read_jsonl(path):
        where = f"{path}:{lineno}"
        fields = {key: string_field(record, key, where) for key in ("prompt", "chosen", "rejected")}
        examples.append({**fields, "text": fields["prompt"] + fields["chosen"]})
    return examples


# --- stdlib-text ------------------------------------------------------------------------------

def load_stdlib_text(spec: DataSpec, seed: int) -> list[dict]:
    if spec.path is not None:
        raise DataError("source 'stdlib-text' takes no 'path'")
    passages = stdlib_passages(spec.options["words"], spec.options.get("part", "all"))
    if spec.options["shuffle"]:
        random.Random(seed).shuffle(passages)
    return [{"text": passage} for passage in passages]


def load_stdlib_pairs(spec: DataSpec, seed: int) -> list[dict]:
    if spec.path is not None:
        raise DataError("source 'stdlib-pairs' takes no 'path'")
    pairs = paragraph_pairs(spec.options["part"], spec.options["min_words"])
    if spec.options["shuffle"]:
        random.Random(seed).shuffle(pairs)
    return [{"text": text} for pair in pairs for text in pair]


# --- image-text -------------------------------------------------------------------------------

def load_image_text(spec: DataSpec, seed: int) -> list[dict]:
    path = require_path(spec)
    size = spec.options["size"]
    examples = []
    for lineno, record in read_jsonl(path):
        where = f"{path}:{lineno}"
        text, image = string_field(record, "text", where), string_field(record, "image", where)
        pixels_chw = load_image(path.parent / image, where)
        if size is not None:
            pixels_chw = torch.nn.functional.interpolate(
                pixels_chw[None], size=(size, size), mode="bilinear", align_corners=False
            )[0]
        examples.append({"text": text, "image": image, "pixel_values": pixels_chw})
    return examples


def load_image(file: Path, where: str) -> torch.Tensor:
    """A float32 [C, H, W] tensor from an image, ``.npy`` or ``.safetensors`` file (no pickle)."""
    if not file.is_file():
        raise DataError(f"image not found: {file.name}", where=where)
    suffix = file.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return _load_picture(file, where)
    if suffix == ".npy":
        import numpy as np

        try:
            array = np.load(file, allow_pickle=False)
        except ValueError as exc:
            raise DataError(f"cannot read {file.name}: {exc}", where=where) from None
        return _as_chw(torch.from_numpy(np.ascontiguousarray(array)), file, where)
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(file))
        except Exception as exc:  # safetensors raises its own error type for a corrupt header
            raise DataError(f"cannot read {file.name}: {exc}", where=where) from None
        if "pixel_values" in tensors:
            return _as_chw(tensors["pixel_values"], file, where)
        if len(tensors) != 1:
            raise DataError(f"{file.name} must hold one tensor or one named 'pixel_values'", where=where)
        return _as_chw(next(iter(tensors.values())), file, where)
    raise DataError(f"unsupported image file {file.name} (use PNG/JPEG, .npy or .safetensors)", where=where)


def _load_picture(file: Path, where: str) -> torch.Tensor:
    try:
        from PIL import Image
    except ImportError:
        raise DataError(f"reading {file.name} needs Pillow (pip install pillow)", where=where) from None
    import numpy as np

    try:
        with Image.open(file) as picture:
            array_hwc = np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0
    except OSError as exc:
        raise DataError(f"cannot read image {file.name}: {exc}", where=where) from None
    return torch.from_numpy(array_hwc).permute(2, 0, 1).contiguous()


def _as_chw(tensor: torch.Tensor, file: Path, where: str) -> torch.Tensor:
    if tensor.ndim == 2:
        tensor = tensor[None]
    if tensor.ndim != 3:
        raise DataError(f"{file.name}: expected an array [C, H, W], got shape {list(tensor.shape)}", where=where)
    return tensor.to(torch.float32)
