"""Probe loss: the mean objective loss of each model of the step over the step's data.

For every model, ``loss = sum_t nll_t / #counted tokens`` over the data entry (token-weighted, so
long and short examples count by their tokens), with the objective's labels (causal-LM: every real
token predicted from the one before). ``answer_only`` (default) counts only answer tokens when the
examples are prompt/answer pairs (the zoo's synthetic tasks): their prompts are random and carry no
signal. When the examples carry a ``task`` field, the loss is also reported per task.

Figures: ``"<model>/loss"`` and ``"<model>/loss/<task>"``.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from pydantic import Field

from surgery import hookimpl
from surgery.core.artifacts import Artifact
from surgery.core.options import Options
from surgery.models.data import batches
from surgery.models.objectives import IGNORE_INDEX, token_nll


class ProbeLossOptions(Options):
    answer_only: bool = Field(True, description="count only answer tokens of prompt/answer examples")
    batch_size: int | None = Field(None, ge=1, description="examples per forward pass (default: the data entry's)")


@torch.no_grad()
def probe_loss(module: torch.nn.Module, batch_iter, answer_only: bool = True) -> tuple[float, int]:
    """(token-weighted mean causal-LM NLL, counted tokens) of ``module`` over the batches."""
    total, count = 0.0, 0
    device = next(module.parameters()).device
    for batch in batch_iter:
        labels_bt = batch["labels"]
        if answer_only and "answer_mask" in batch:
            labels_bt = labels_bt.masked_fill(batch["answer_mask"] == 0, IGNORE_INDEX)
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "pixel_values") if k in batch}
        logits_btv = module(**inputs).logits.float().cpu()
        nll_bt, counted_bt = token_nll(logits_btv[:, :-1], labels_bt[:, 1:])
        total += float(nll_bt.sum())
        count += int(counted_bt.sum())
    return total / max(count, 1), count


class ProbeLoss:
    """Token-weighted causal-LM loss of each model on the step's data, overall and per task."""

    @hookimpl
    def option_schema(self, stage: str):
        return ProbeLossOptions if stage == "evaluate" else None

    @hookimpl
    def evaluate(self, ctx) -> Artifact:
        examples = ctx.examples()
        groups: dict[str, list[dict]] = defaultdict(list)
        for example in examples:
            groups[str(example.get("task", "all"))].append(example)
        spec_size = ctx.run.recipe.data[ctx.step.data].batch_size if ctx.step.data else 8
        size = ctx.options.batch_size or spec_size
        max_tokens = ctx.run.recipe.data[ctx.step.data].max_tokens if ctx.step.data else None
        figures: dict[str, float] = {}
        for name in ctx.models:
            loaded = ctx.model(name)
            total, count = 0.0, 0
            for task, group in groups.items():
                loss, n = probe_loss(loaded.module, batches(group, loaded.tokenizer, size, max_tokens), ctx.options.answer_only)
                if len(groups) > 1 or task != "all":
                    figures[f"{name}/loss/{task}"] = loss
                total, count = total + loss * n, count + n
            figures[f"{name}/loss"] = total / max(count, 1)
            ctx.log(f"{name}: probe loss {figures[f'{name}/loss']:.4f}")
        return Artifact(meta={"models": ctx.models, "answer_only": ctx.options.answer_only}, figures=figures)


probe_loss_plugin = ProbeLoss()
