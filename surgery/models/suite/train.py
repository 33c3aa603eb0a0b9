"""Fine-tuning on a suite task and scoring prompt/answer examples with any causal LM and tokenizer.

Both run the decoder on the whole sequence but the output head only on the positions that predict
an answer token: with prompts of ~12 tokens and answers of ~3, that skips most of the head's cost
(for SmolLM2, a 49152 x 576 matrix per position) in training and in evaluation.

Training: AdamW (betas 0.9/0.98, no weight decay), linear warm-up then cosine decay to 10%, gradient
norm clipped at 1, cross-entropy on the answer tokens only, fresh training examples every step,
on one intra-op thread under the seed (the same weights whatever the machine's core count).
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Callable

import torch
import torch.nn.functional as F

from surgery.models.data import batches
from surgery.models.suite.tasks import make_examples
from surgery.models.zoo.train import single_thread

MAX_TOKENS = 64


def answer_hidden(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logits_nv, targets_n, row_n)``: the head's logits at the N positions that predict an answer token."""
    device = next(model.parameters()).device
    hidden_btd = model.base_model(input_ids=batch["input_ids"].to(device),
                                  attention_mask=batch["attention_mask"].to(device)).last_hidden_state
    predicts_bt = batch["answer_mask"][:, 1:].bool().to(device)
    targets_n = batch["input_ids"][:, 1:].to(device)[predicts_bt]
    logits_nv = model.get_output_embeddings()(hidden_btd[:, :-1][predicts_bt])
    rows_n = torch.arange(predicts_bt.shape[0], device=device)[:, None].expand_as(predicts_bt)[predicts_bt]
    return logits_nv.float(), targets_n, rows_n


def finetune(model: torch.nn.Module, tokenizer: Any, task: str, seed: int, steps: int, batch_size: int,
             lr: float, warmup: int, callback: Callable[[int, float], None] | None = None) -> list[float]:
    """Train ``model`` in place on ``task``'s train split; returns the loss per step."""
    with single_thread(seed):
        examples = make_examples(task, steps * batch_size, seed=seed, split="train")
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, steps, warmup))
        model.train()
        losses = []
        for step, batch in enumerate(batches(examples, tokenizer, batch_size, MAX_TOKENS)):
            logits_nv, targets_n, _ = answer_hidden(model, batch)
            loss = F.cross_entropy(logits_nv, targets_n)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            if callback is not None:
                callback(step, losses[-1])
        model.eval()
    return losses


@torch.no_grad()
def score_examples(model: torch.nn.Module, tokenizer: Any, examples: list[dict[str, Any]],
                   batch_size: int = 32) -> dict[str, dict[str, float]]:
    """Per task: ``accuracy`` (exact match), ``nll`` (answer-token mean) and ``n`` examples.

    Exact match is teacher-forced: an example counts only if the argmax at every answer position is
    the true token, which is when greedy decoding would produce exactly the answer's tokens.
    """
    was_training = model.training
    model.eval()
    correct: dict[str, int] = defaultdict(int)
    count: dict[str, int] = defaultdict(int)
    nll: dict[str, float] = defaultdict(float)
    tokens: dict[str, int] = defaultdict(int)
    for start, batch in zip(range(0, len(examples), batch_size),
                            batches(examples, tokenizer, batch_size, MAX_TOKENS)):
        chunk = examples[start:start + batch_size]
        logits_nv, targets_n, rows_n = answer_hidden(model, batch)
        wrong_b = torch.zeros(len(chunk), dtype=torch.long).index_add_(
            0, rows_n.cpu(), (logits_nv.argmax(-1) != targets_n).long().cpu())
        token_nll_n = F.cross_entropy(logits_nv, targets_n, reduction="none").cpu()
        row_nll_b = torch.zeros(len(chunk), dtype=torch.float64).index_add_(0, rows_n.cpu(), token_nll_n.double())
        row_tokens_b = torch.bincount(rows_n.cpu(), minlength=len(chunk))
        for i, example in enumerate(chunk):
            task = str(example.get("task", "all"))
            count[task] += 1
            correct[task] += int(wrong_b[i] == 0 and row_tokens_b[i] > 0)
            nll[task] += float(row_nll_b[i])
            tokens[task] += int(row_tokens_b[i])
    model.train(was_training)
    return {task: {"accuracy": correct[task] / count[task], "nll": nll[task] / max(tokens[task], 1), "n": count[task]}
            for task in count}


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
