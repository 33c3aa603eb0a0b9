"""Synthetic tasks the zoo models are trained and evaluated on.

Every example is whitespace tokens: ``prompt`` (ends with ``=``), ``answer`` and
``text = prompt + " " + answer``. Examples are drawn deterministically from ``(task, split, seed)``.
The split is a property of the example's content (a hash of it), so ``split="train"`` and
``split="test"`` never share an example, whatever the seeds: the held-out accuracy measures
generalisation, not recall. The exception is ``add``: its whole input space is 23 x 23 pairs, and
generalising modular addition to unseen pairs ("grokking") takes far longer than the zoo's budget,
so both splits draw from all pairs and differ only by seed (a recall task). The zoo trains on
``"train"``; probes and evaluation default to ``"test"``.

Tasks (sequence items are the numbers 0..9, sequences 3..6 long):

- ``copy``     ``copy: 3 1 4 =``      -> ``3 1 4``
- ``reverse``  ``reverse: 3 1 4 =``   -> ``4 1 3``
- ``sort``     ``sort: 3 1 4 =``      -> ``1 3 4``
- ``inc``      ``inc: 3 9 4 =``       -> ``4 0 5`` (each item + 1 modulo 10)
- ``add``      ``add: 17 9 =``        -> ``3`` (addition modulo 23, operands 0..22)
- ``colour``   ``<image> x4 colour: =`` -> ``red`` (the colour of the shape in ``pixel_values``)
- ``shape``    ``<image> x4 shape: =``  -> ``circle``

The image tasks carry ``pixel_values`` (float tensor [3, 16, 16]: one filled circle, square or
triangle of radius 5-6 centred near the middle, on grey noise) and four ``<image>`` tokens, the
number of patch features a 16x16 image with 8x8 patches gives a LLaVA model. Their split key
includes the pixel noise, so held-out images are new images of the same few placements.
"""
from __future__ import annotations

import hashlib
import random
from typing import Any, Callable

import torch

from surgery.core.errors import DataError
from surgery.models.zoo.tokenizer import COLOURS, IMAGE, SHAPES

SEQUENCE_ITEMS = 10
SEQUENCE_LENGTHS = (3, 6)
MODULUS = 23
IMAGE_SIZE = 16
IMAGE_TOKENS = 4  # (16 / 8) ** 2 patches
TEST_SHARE = 5  # one example in five (by content hash) is held out
SEED_SPLIT_TASKS = ("add",)  # all 529 inputs are seen in training: held out only by seed

TEXT_TASKS = ("copy", "reverse", "sort", "inc", "add")
IMAGE_TASKS = ("colour", "shape")
TASKS = TEXT_TASKS + IMAGE_TASKS
MIXES = {"synthetic-mix": TEXT_TASKS, "synthetic-image-mix": IMAGE_TASKS}

_RGB = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.25, 0.95), "yellow": (0.95, 0.9, 0.1)}


def make_examples(task: str, n: int, seed: int = 0, split: str = "test") -> list[dict[str, Any]]:
    """``n`` examples of ``task`` (or a mix name, see ``resolve_tasks``), deterministic in ``seed``.

    Each example has ``task``, ``prompt``, ``answer``, ``text`` and, for image tasks,
    ``pixel_values`` (float32 [3, 16, 16]). A mix interleaves its tasks round-robin.
    """
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    tasks = resolve_tasks(task)
    rng = random.Random(f"{'+'.join(tasks)}/{split}/{seed}")
    return [_draw(tasks[i % len(tasks)], rng, split) for i in range(n)]


def resolve_tasks(task: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """A task name, a mix name (``synthetic-mix``) or a list of task names -> task names."""
    names = [task] if isinstance(task, str) else list(task)
    tasks: list[str] = []
    for name in names:
        if name in MIXES:
            tasks.extend(MIXES[name])
        elif name in TASKS:
            tasks.append(name)
        else:
            from surgery.core.registry import did_you_mean

            raise DataError(f"unknown synthetic task {name!r}" + did_you_mean(name, list(TASKS) + list(MIXES)))
    if not tasks:
        raise DataError("no synthetic task given")
    return tuple(tasks)


def check_answer(example: dict[str, Any]) -> bool:
    """Recompute the answer from the prompt (or the pixels) independently of the generator."""
    words = [word for word in example["prompt"].split() if word != IMAGE]
    task, items = words[0].rstrip(":"), [int(w) for w in words[1:-1] if w.isdigit()]
    expected = {
        "copy": lambda: items,
        "reverse": lambda: items[::-1],
        "sort": lambda: sorted(items),
        "inc": lambda: [(x + 1) % SEQUENCE_ITEMS for x in items],
        "add": lambda: [sum(items) % MODULUS],
    }
    if task in expected:
        return example["answer"].split() == [str(x) for x in expected[task]()]
    return example["answer"] == read_image(example["pixel_values"])[task]


def read_image(image_chw: torch.Tensor) -> dict[str, str]:
    """Colour and shape of a ``draw_shape`` image, read from its pixels (a test oracle).

    The shape is where some channel is far from the grey background; its colour is the nearest
    palette colour to the mean; its shape follows from how much of its bounding box it fills
    (square 1, circle about pi/4, triangle about 1/2).
    """
    background = 0.3 * 2 - 1
    inside_hw = ((image_chw - background).abs() > 0.5).any(dim=0)
    mean_rgb = ((image_chw[:, inside_hw] + 1) / 2).mean(dim=1)
    colour = min(_RGB, key=lambda name: float((torch.tensor(_RGB[name]) - mean_rgb).norm()))
    rows, cols = inside_hw.any(dim=1).nonzero(), inside_hw.any(dim=0).nonzero()
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    fill = float(inside_hw.sum() / box)
    shape = "square" if fill > 0.95 else "circle" if fill > 0.65 else "triangle"
    return {"colour": colour, "shape": shape}


# --- drawing ----------------------------------------------------------------------------------

def _draw(task: str, rng: random.Random, split: str) -> dict[str, Any]:
    draw = _DRAWERS[task]
    while True:  # rejection sampling into the split; a draw is kept with probability 1/5 or 4/5
        example = draw(rng)
        if task in SEED_SPLIT_TASKS or _is_test(example["key"]) == (split == "test"):
            break
    del example["key"]
    example["task"] = task
    example["text"] = example["prompt"] + " " + example["answer"]
    return example


def _is_test(key: str) -> bool:
    digest = hashlib.sha1(key.encode()).digest()
    return int.from_bytes(digest[:4], "big") % TEST_SHARE == 0


def _sequence_task(name: str, transform: Callable[[list[int]], list[int]]) -> Callable[[random.Random], dict]:
    def draw(rng: random.Random) -> dict[str, Any]:
        items = [rng.randrange(SEQUENCE_ITEMS) for _ in range(rng.randint(*SEQUENCE_LENGTHS))]
        prompt = f"{name}: {_words(items)} ="
        return {"prompt": prompt, "answer": _words(transform(items)), "key": prompt}

    return draw


def _draw_add(rng: random.Random) -> dict[str, Any]:
    a, b = rng.randrange(MODULUS), rng.randrange(MODULUS)
    prompt = f"add: {a} {b} ="
    return {"prompt": prompt, "answer": str((a + b) % MODULUS), "key": prompt}


def _image_task(name: str) -> Callable[[random.Random], dict]:
    def draw(rng: random.Random) -> dict[str, Any]:
        colour, shape = rng.choice(COLOURS), rng.choice(SHAPES)
        cx, cy, radius = rng.randint(7, 8), rng.randint(7, 8), rng.randint(5, 6)
        noise_seed = rng.getrandbits(62)
        pixels = draw_shape(colour, shape, cx, cy, radius, noise_seed=noise_seed)
        prompt = " ".join([IMAGE] * IMAGE_TOKENS) + f" {name}: ="
        label = {"colour": colour, "shape": shape}
        return {"prompt": prompt, "answer": label[name], "pixel_values": pixels,
                "key": f"{colour}/{shape}/{cx}/{cy}/{radius}/{noise_seed}"}

    return draw


def draw_shape(colour: str, shape: str, cx: int, cy: int, radius: int, noise_seed: int = 0) -> torch.Tensor:
    """A 16x16 RGB image (values about -1..1, float32 [3, 16, 16]) of one filled shape on grey noise."""
    ys, xs = torch.meshgrid(torch.arange(IMAGE_SIZE), torch.arange(IMAGE_SIZE), indexing="ij")
    dx, dy = (xs - cx).float(), (ys - cy).float()
    if shape == "circle":
        inside = dx**2 + dy**2 <= radius**2
    elif shape == "square":
        inside = (dx.abs() <= radius) & (dy.abs() <= radius)
    else:  # triangle pointing up: width grows with the distance from the apex
        inside = (dy >= -radius) & (dy <= radius) & (dx.abs() <= (dy + radius) / 2)
    generator = torch.Generator().manual_seed(noise_seed)
    image_chw = 0.3 + 0.05 * torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    rgb = torch.tensor(_RGB[colour]).view(3, 1, 1).expand(3, IMAGE_SIZE, IMAGE_SIZE)
    image_chw = torch.where(inside, rgb, image_chw)
    return (image_chw * 2 - 1).float()


def _words(items: list[int]) -> str:
    return " ".join(str(x) for x in items)


_DRAWERS: dict[str, Callable[[random.Random], dict]] = {
    "copy": _sequence_task("copy", lambda s: list(s)),
    "reverse": _sequence_task("reverse", lambda s: s[::-1]),
    "sort": _sequence_task("sort", sorted),
    "inc": _sequence_task("inc", lambda s: [(x + 1) % SEQUENCE_ITEMS for x in s]),
    "add": _draw_add,
    "colour": _image_task("colour"),
    "shape": _image_task("shape"),
}


# --- scoring ----------------------------------------------------------------------------------

@torch.no_grad()
def accuracy(model: torch.nn.Module, tokenizer: Any, task: str, n: int = 256, seed: int = 1,
             batch_size: int = 128, split: str = "test") -> float:
    """Exact-match accuracy of the whole answer on ``n`` held-out examples of ``task``.

    Causal models: teacher-forced argmax at every answer position. An answer counts as right only if
    every position's argmax is the true token, and then greedy decoding would have produced exactly
    these tokens (each step's input is the previous true = predicted token), so this equals greedy
    exact match. Masked models: every answer position is ``<mask>`` and all are predicted in one pass.
    """
    from surgery.models.zoo.architectures import prepare_for_inference
    from surgery.models.zoo.encode import answer_logits, encode, is_masked_model, model_inputs
    from surgery.models.zoo.train import one_thread

    prepare_for_inference(model)
    was_training = model.training
    model.eval()
    masked = is_masked_model(model)
    device = next(model.parameters()).device
    examples = make_examples(task, n, seed, split)
    correct = 0
    with one_thread():
        for start in range(0, n, batch_size):
            batch = encode(examples[start : start + batch_size], tokenizer, mask_answer=masked)
            logits_btv = model(**model_inputs(batch, device)).logits.float().cpu()
            predicted_bt = answer_logits(logits_btv, batch, masked).argmax(dim=-1)
            wrong_b = ((predicted_bt != batch["targets"]) & batch["answer_mask"]).any(dim=1)
            correct += int((~wrong_b).sum())
    model.train(was_training)
    return correct / n
