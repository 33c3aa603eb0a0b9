"""The zoo's training loop: short, seeded, single-threaded runs on freshly drawn synthetic batches.

Objectives (only answer tokens are trained; prompts are random and carry no signal):

- ``causal``: next-token cross-entropy on the answer tokens and the closing ``<eos>``.
- ``masked``: the whole answer is ``<mask>``; cross-entropy on the answer positions (BERT-style).
- ``diffusion``: masked diffusion as in LLaDA: per row a ratio t ~ U(0, 1], each answer token masked
  with probability t, cross-entropy on masked tokens weighted 1/t and divided by the answer length.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from surgery.models.zoo.encode import answer_logits, encode, model_inputs
from surgery.models.zoo.tasks import make_examples

OBJECTIVES = ("causal", "masked", "diffusion")


def train(model: torch.nn.Module, tokenizer: Any, tasks: tuple[str, ...], steps: int, lr: float,
          batch_size: int, seed: int, objective: str, param_groups: list[dict[str, Any]] | None = None,
          warmup: int = 20, callback: Callable[[int, float], None] | None = None) -> list[float]:
    """Train ``model`` in place with AdamW (warm-up then cosine decay); returns the loss per step.

    ``param_groups`` (AdamW's format, e.g. ``[{"params": [...], "lr": 3e-4}]``) default to all
    parameters at ``lr``. ``callback(step, loss)`` is called after every step (progress, curves).
    Runs on one intra-op thread (see ``one_thread``).
    """
    with one_thread():
        return _train(model, tokenizer, tasks, steps, lr, batch_size, seed, objective, param_groups, warmup, callback)


def _train(model: torch.nn.Module, tokenizer: Any, tasks: tuple[str, ...], steps: int, lr: float, batch_size: int,
           seed: int, objective: str, param_groups: list[dict[str, Any]] | None, warmup: int,
           callback: Callable[[int, float], None] | None) -> list[float]:
    generator = torch.Generator().manual_seed(seed)
    groups = param_groups if param_groups is not None else [{"params": list(model.parameters())}]
    trainable = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, steps, warmup))
    model.train()
    losses = []
    for step in range(steps):
        examples = make_examples(list(tasks), batch_size, seed=seed * 1_000_003 + step, split="train")
        loss = objective_loss(model, tokenizer, examples, objective, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if callback is not None:
            callback(step, losses[-1])
    model.eval()
    return losses


def objective_loss(model: torch.nn.Module, tokenizer: Any, examples: list[dict], objective: str,
                   generator: torch.Generator) -> torch.Tensor:
    """The mean training loss of one batch of examples under ``objective``.

    Examples with images and without are run as two sub-batches (their prompts differ in kind).
    """
    with_image = [example for example in examples if "pixel_values" in example]
    without = [example for example in examples if "pixel_values" not in example]
    if with_image and without:
        parts = [(_batch_loss(model, tokenizer, part, objective, generator), len(part)) for part in (with_image, without)]
        return sum(loss * count for loss, count in parts) / len(examples)
    return _batch_loss(model, tokenizer, examples, objective, generator)


def _batch_loss(model: torch.nn.Module, tokenizer: Any, examples: list[dict], objective: str,
                generator: torch.Generator) -> torch.Tensor:
    if objective == "causal":
        batch = encode(examples, tokenizer)
        logits_btv = answer_logits(model(**model_inputs(batch)).logits, batch, masked=False)
        eos_bt = (batch["targets"] == tokenizer.eos_token_id) & batch["attention_mask"].bool()
        return _cross_entropy(logits_btv, batch["targets"], batch["answer_mask"] | eos_bt)
    if objective == "masked":
        batch = encode(examples, tokenizer, mask_answer=True)
        logits_btv = model(**model_inputs(batch)).logits
        return _cross_entropy(logits_btv, batch["targets"], batch["answer_mask"])
    if objective == "diffusion":
        return _diffusion_loss(model, tokenizer, examples, generator)
    raise ValueError(f"unknown objective {objective!r}")


def _diffusion_loss(model: torch.nn.Module, tokenizer: Any, examples: list[dict],
                    generator: torch.Generator) -> torch.Tensor:
    batch = encode(examples, tokenizer)
    answer_bt = batch["answer_mask"]
    ratio_b1 = 1.0 - torch.rand(len(examples), 1, generator=generator)  # t in (0, 1]
    masked_bt = answer_bt & (torch.rand(answer_bt.shape, generator=generator) < ratio_b1)
    batch["input_ids"] = batch["targets"].masked_fill(masked_bt, tokenizer.mask_token_id)
    logits_btv = model(**model_inputs(batch)).logits
    token_loss_bt = F.cross_entropy(logits_btv.transpose(1, 2), batch["targets"], reduction="none")
    weighted_b = (token_loss_bt * masked_bt / ratio_b1).sum(dim=1) / answer_bt.sum(dim=1)
    return weighted_b.mean()


def _cross_entropy(logits_btv: torch.Tensor, targets_bt: torch.Tensor, keep_bt: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_btv[keep_bt], targets_bt[keep_bt])


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


@contextmanager
def one_thread() -> Iterator[None]:
    """Run a block on one intra-op thread, then restore the thread count.

    One thread makes the float reductions, and so the trained weights, the same whatever the
    machine's core count. For models this small it is as fast as several threads on an idle
    machine, and many times faster on a busy one (threads that wait for each other spin).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextmanager
def single_thread(seed: int) -> Iterator[None]:
    """``one_thread`` with the global torch seed set to ``seed``; the global RNG state is restored after."""
    rng_state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        with one_thread():
            yield
    finally:
        torch.set_rng_state(rng_state)
