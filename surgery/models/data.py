"""Recipe data entries: the ``DataSpec`` schema, the data-source registry, loading and batching.

A recipe names its data sets under ``data:``; each entry is one flat mapping::

    data:
      probe: {source: stdlib-text, words: 48, max_samples: 64, max_tokens: 64}
      prefs: {source: preference, path: prefs.jsonl, batch_size: 4}

The keys every source shares are ``DataSpec``'s fields (``source``, ``path``, ``max_samples``,
``max_tokens``, ``batch_size``, ``seed``). Any other key is a source option: a source declares them
with a schema when it registers, ``register(name, load, schema)`` (``schema`` a
:class:`surgery.core.options.Options` subclass, or ``None`` for a source without options), and
``parse_data_spec`` validates them against it before anything is loaded. The validated options
(defaults filled in) are kept in ``spec.options`` as a plain JSON dict. ``source: builtin:NAME``
is the same as ``source: NAME``.

A source's ``load(spec, seed) -> list[dict]`` receives the spec with ``path`` resolved (relative
paths are relative to the recipe file's directory) and returns examples, each a dict with
``"text"``; optionally ``"prompt"`` and ``"answer"`` (then ``text`` is the prompt followed by the
answer), preference fields ``"prompt"``, ``"chosen"``, ``"rejected"``, or ``"pixel_values"``
(a float tensor, e.g. [C, H, W]). ``read_jsonl`` and ``require_path`` help sources report bad
files as one-line :class:`DataError` messages naming the file and line.

``batches`` turns examples into padded tensors; see its docstring for the label conventions.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import pydantic
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from surgery.core.errors import DataError
from surgery.core.registry import did_you_mean
from surgery.models.registries import DataSource, DataSourceRegistry

BUILTIN = "builtin:"
IGNORE_INDEX = -100  # label of positions the loss skips (padding)


class DataSpec(BaseModel):
    """One recipe data entry. Source options live in ``options`` (validated by the source)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    source: str = Field(description="registered data source, e.g. jsonl, preference, stdlib-text")
    path: str | None = Field(None, description="data file, relative to the recipe file's directory")
    max_samples: int | None = Field(None, ge=1, description="keep the first N examples")
    max_tokens: int | None = Field(128, ge=1, description="truncate each sequence to N tokens")
    batch_size: int = Field(8, ge=1, description="examples per batch")
    seed: int | None = Field(None, description="overrides the recipe seed for this data set")
    options: dict[str, Any] = Field(default_factory=dict, description="source options (validated by the source)")

    @field_validator("source")
    @classmethod
    def _strip_builtin(cls, value: str) -> str:
        return value[len(BUILTIN):] if value.startswith(BUILTIN) else value


SPEC_KEYS = set(DataSpec.model_fields) - {"options"}


# --- specs --------------------------------------------------------------------------------------

def parse_data_spec(value: Any, sources: DataSourceRegistry, base_dir: Path | None = None) -> DataSpec:
    """Validate a recipe data entry (a mapping, or a bare source name); load nothing.

    Resolves ``path`` against ``base_dir`` and checks that the file exists.
    """
    if isinstance(value, str):
        value = {"source": value}
    if not isinstance(value, dict):
        raise DataError("expected a mapping with 'source'")
    if "source" not in value:
        raise DataError("missing key 'source'" + did_you_mean("source", list(value)))
    common = {k: v for k, v in value.items() if k in SPEC_KEYS}
    options = {k: v for k, v in value.items() if k not in SPEC_KEYS}
    spec = DataSpec(**common, options=options)
    return resolve_spec(spec, sources, base_dir)


def resolve_spec(spec: DataSpec, sources: DataSourceRegistry, base_dir: Path | None = None) -> DataSpec:
    """Check the source and its options, make ``path`` absolute and check the file exists."""
    source = sources.get(spec.source)
    update: dict[str, Any] = {"options": _validate_options(source, spec.options)}
    if spec.path is not None:
        path = Path(spec.path).expanduser()
        if not path.is_absolute():
            path = (base_dir or Path.cwd()) / path
        if not path.exists():
            raise DataError(f"data file not found: {spec.path}")
        if not (path.is_file() or path.is_dir()):  # a FIFO or a device would block or never end
            raise DataError(f"{spec.path}: not a regular file")
        update["path"] = str(path.resolve())
    return spec.model_copy(update=update)


def _validate_options(source: DataSource, options: dict[str, Any]) -> dict[str, Any]:
    if source.schema is None:
        if options:
            key = next(iter(options))
            raise DataError(f"unknown key {key!r} for source {source.name!r}" + did_you_mean(key, sorted(SPEC_KEYS)))
        return {}
    try:
        return source.schema.model_validate(options).model_dump(mode="json")
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        hint = did_you_mean(loc, sorted(SPEC_KEYS | set(source.schema.model_fields))) if err["type"] == "extra_forbidden" else ""
        raise DataError(f"source {source.name!r}: {loc}: {err['msg']}{hint}") from None


# --- loading ------------------------------------------------------------------------------------

def load_examples(spec: DataSpec, seed: int, sources: DataSourceRegistry, base_dir: Path | None = None) -> list[dict]:
    """Load the examples of ``spec`` (the spec's own ``seed`` wins over ``seed``), in a fixed order."""
    spec = resolve_spec(spec, sources, base_dir)
    source = sources.get(spec.source)
    examples = source.load(spec, spec.seed if spec.seed is not None else seed)
    if not examples:
        raise DataError(f"data source {spec.source!r} gave no examples" + (f" ({spec.path})" if spec.path else ""))
    examples = examples[: spec.max_samples] if spec.max_samples else examples
    try:
        example_kind(examples)  # one kind throughout, every field there: fail here, not mid-step
    except DataError as exc:
        raise DataError(str(exc), where=spec.path or f"source {spec.source!r}") from None
    return examples


def require_path(spec: DataSpec) -> Path:
    """The spec's data file; a DataError when the source needs one and none is given."""
    if spec.path is None:
        raise DataError(f"source {spec.source!r} needs a 'path' to a data file")
    return Path(spec.path)


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """``(line number, record)`` for every non-blank line of a UTF-8 JSONL file of objects."""
    if not path.is_file():
        raise DataError("not a file", where=str(path))
    records = []
    for lineno, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError("not UTF-8 text", where=f"{path}:{lineno}") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"invalid JSON (truncated line?): {exc.msg}", where=f"{path}:{lineno}") from None
        if not isinstance(record, dict):
            raise DataError(f"expected a JSON object, got {type(record).__name__}", where=f"{path}:{lineno}")
        records.append((lineno, record))
    if not records:
        raise DataError("empty data file", where=str(path))
    return records


def string_field(record: dict, key: str, where: str) -> str:
    """``record[key]`` as a string; a DataError naming ``where`` (file:line) otherwise."""
    if key not in record:
        raise DataError(f"missing field {key!r}", where=where)
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"field {key!r} must be a string, got {type(value).__name__}", where=where)
    return value


# --- batching -----------------------------------------------------------------------------------

def batches(
    examples: list[dict], tokenizer: Any, batch_size: int, max_tokens: int | None
) -> Iterator[dict[str, torch.Tensor]]:
    """Padded batches of ``examples`` in their given order.

    Each batch has ``input_ids`` [B, T], ``attention_mask`` [B, T] (1 = real token) and ``labels``
    [B, T] (= ``input_ids`` on every real token, ``-100`` on padding; aligned with ``input_ids``,
    objectives shift them for causal LMs). Sequences are tokenized with the tokenizer's special
    tokens, cut to ``max_tokens`` (the end is dropped) and right-padded with the pad token (the EOS
    token is made the pad token when the tokenizer has none). T is the longest sequence in the batch.

    - prompt/answer examples: ``text`` (prompt followed by answer) is tokenized whole, so the
      sequence is what a model trained on ``text`` saw; ``answer_mask`` [B, T] (long, 1 on answer
      tokens) marks the tokens after the prompt's, special tokens (a closing EOS) excluded.
      ``labels`` still cover all real tokens, prompt and EOS included: objectives that score only
      the answer multiply by ``answer_mask``.
    - preference examples (``prompt``, ``chosen``, ``rejected``): the batch holds the keys above
      twice, prefixed ``chosen_`` and ``rejected_`` (prompt + that response, with ``answer_mask``
      on the response); ``split_preference`` separates them. The chosen side is there a third time
      without a prefix (prompt + chosen is the example's ``text``), so a step that reads plain
      sequences (a capture, an attribution) works on preference data too.
    - ``pixel_values`` of the examples are stacked into [B, ...].
    - ``mask_token_id`` (an int) when the tokenizer has a mask token, for masked objectives.
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    pad_id = ensure_pad_token(tokenizer)
    kind = example_kind(examples)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        if kind == "preference":
            batch = {}
            prompts = [ex["prompt"] for ex in chunk]
            for side in ("chosen", "rejected"):
                texts = [ex["prompt"] + ex[side] for ex in chunk]
                padded = _pad(_encode_answers(tokenizer, prompts, texts, max_tokens, start), pad_id, with_answer=True)
                batch.update({f"{side}_{key}": value for key, value in padded.items()})
                if side == "chosen":
                    batch.update(padded)
        elif kind == "prompt":
            prompts = [ex["prompt"] for ex in chunk]
            texts = [ex.get("text") or ex["prompt"] + ex["answer"] for ex in chunk]
            batch = _pad(_encode_answers(tokenizer, prompts, texts, max_tokens, start), pad_id, with_answer=True)
        else:
            ids = tokenizer([ex["text"] for ex in chunk], add_special_tokens=True)["input_ids"]
            seqs = [(_truncate(s, max_tokens, start + i), []) for i, s in enumerate(ids)]
            batch = _pad(seqs, pad_id, with_answer=False)
        if "pixel_values" in chunk[0]:
            batch["pixel_values"] = _stack_pixels(chunk, start)
        if getattr(tokenizer, "mask_token_id", None) is not None:
            batch["mask_token_id"] = int(tokenizer.mask_token_id)  # for the masking objectives
        yield batch


def split_preference(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(chosen, rejected)`` batches from a preference batch, with the prefixes removed."""
    sides = []
    for side in ("chosen", "rejected"):
        prefix = f"{side}_"
        part = {key[len(prefix):]: value for key, value in batch.items() if key.startswith(prefix)}
        part.update({key: value for key, value in batch.items() if key == "pixel_values"})
        sides.append(part)
    return sides[0], sides[1]


def ensure_pad_token(tokenizer: Any) -> int:
    """The pad token id; sets pad = EOS on a tokenizer that has no pad token."""
    if tokenizer is None:
        raise DataError("the model has no tokenizer (no tokenizer files in its directory) to encode the data with")
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise DataError("the tokenizer has neither a pad nor an EOS token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    return int(tokenizer.pad_token_id)


def example_kind(examples: list[dict]) -> str:
    """``"preference"``, ``"prompt"`` or ``"text"``: what every example carries (mixing is an error)."""
    if not examples:
        raise DataError("no examples to batch")
    kinds = {_kind(ex, i) for i, ex in enumerate(examples)}
    if len(kinds) > 1:
        raise DataError(f"examples mix kinds {sorted(kinds)}; a data set must be all one kind")
    return kinds.pop()


def _kind(example: dict, index: int) -> str:
    if "chosen" in example or "rejected" in example:
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in example]
        kind = "preference"
    elif "prompt" in example or "answer" in example:
        missing = [k for k in ("prompt", "answer") if k not in example]
        kind = "prompt"
    else:
        missing = [] if "text" in example else ["text"]
        kind = "text"
    if missing:
        raise DataError(f"example {index} has no {missing[0]!r}")
    return kind


def _encode_answers(
    tokenizer: Any, prompts: list[str], texts: list[str], max_tokens: int | None, start: int
) -> list[tuple[list[int], list[int]]]:
    """``(ids, answer_mask)`` per example: ``text`` tokenized whole, cut to ``max_tokens``.

    The answer is what follows the longest common prefix of the tokens of ``text`` and of
    ``prompt`` (both with special tokens), less special tokens such as a closing EOS.
    """
    full = tokenizer(texts, add_special_tokens=True)["input_ids"]
    heads = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    special = set(tokenizer.all_special_ids)
    out = []
    for i, (ids, head) in enumerate(zip(full, heads)):
        shared = _common_prefix(ids, head)
        mask = [int(pos >= shared and tok not in special) for pos, tok in enumerate(ids)]
        ids = _truncate(ids, max_tokens, start + i)
        out.append((ids, mask[: len(ids)]))
    return out


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _truncate(ids: list[int], max_tokens: int | None, index: int) -> list[int]:
    if not ids:
        raise DataError(f"example {index} gives no tokens")
    return list(ids[:max_tokens]) if max_tokens else list(ids)


def _pad(seqs: list[tuple[list[int], list[int]]], pad_id: int, with_answer: bool) -> dict[str, torch.Tensor]:
    longest = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    answer_mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for row, (ids, mask) in enumerate(seqs):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        if with_answer:
            answer_mask[row, : len(mask)] = torch.tensor(mask, dtype=torch.long)
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if with_answer:
        batch["answer_mask"] = answer_mask
    return batch


def _stack_pixels(chunk: list[dict], start: int) -> torch.Tensor:
    shapes = {tuple(ex["pixel_values"].shape) for ex in chunk if "pixel_values" in ex}
    if len(shapes) != 1 or any("pixel_values" not in ex for ex in chunk):
        raise DataError(f"images in the batch at example {start} differ in shape {sorted(shapes)} or are missing")
    return torch.stack([torch.as_tensor(ex["pixel_values"], dtype=torch.float32) for ex in chunk])
