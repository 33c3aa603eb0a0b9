"""The preference-optimisation loop behind the ``tune`` step: cached reference, checkpoints, resume.

- Reference quantities are computed once, before training, in one pass of the reference model
  over the examples: the response log-probability sums and lengths of ``chosen`` and ``rejected``,
  and the constraint's cacheable per-example quantities (FPO: pooled SAE features). TDPO's SeqKL
  needs the reference's whole next-token distribution at every response position; caching
  ``T x V`` per example is what FPO avoids, so the reference forward for TDPO runs each step.
- Training is deterministic from the seed: epoch e visits the examples in the order of
  ``randperm(seed, e)``, the learning rate is a function of the step, and AdamW's state is saved
  with the weights. A run resumed from a checkpoint therefore continues exactly as if it had not
  stopped.
- Checkpoints (policy weights, optimiser moments, the reference cache, the history) go to a
  directory ``ckpt-<step>`` written file by file through ``surgery.core.io``; ``state.json``, written
  last and atomically, names the newest complete one, so a crash never leaves a checkpoint that
  looks complete but is not.
"""
from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

import torch

from surgery.core.io import read_json, read_tensors, write_json, write_tensors
from surgery.engines.preference import (
    DEFAULT_BETA, dpo_loss, fpo_loss, kl_per_position, sequence_logps, shifted_mask, simpo_loss, tdpo_loss
)
from surgery.models.data import batches as make_batches
from surgery.models.data import split_preference

Progress = Callable[..., Iterable]  # (iterable, desc, total) -> iterable, e.g. ctx.progress


class Constraint(Protocol):
    """What ``constrain`` plugins return (see ``surgery.plugins.fpo``)."""

    site: str | None  # module path whose output ``from_outputs`` needs; None when logits suffice
    cacheable: bool  # True when ``reference`` returns per-row tensors worth caching per example

    def reference(self, batch: dict) -> dict[str, torch.Tensor]: ...

    def from_outputs(self, logits_btv: torch.Tensor, resid_btd: torch.Tensor | None, batch: dict,
                     reference: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def penalty(self, policy_model: torch.nn.Module, batch: dict) -> torch.Tensor: ...


@dataclass
class TuneSettings:
    loss: str = "fpo"
    beta: float | None = None  # None: the loss's default (DEFAULT_BETA)
    alpha: float = 0.5
    gamma: float = 0.5
    lr: float = 5e-5
    warmup_steps: int = 10
    weight_decay: float = 0.0
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 8
    max_tokens: int | None = 128
    grad_clip: float = 1.0
    checkpoint_every: int = 50
    seed: int = 0

    @property
    def effective_beta(self) -> float:
        return self.beta if self.beta is not None else DEFAULT_BETA[self.loss]


# --- forward passes ----------------------------------------------------------------------------

class Forward:
    """Runs a model on a batch, returning ``(logits, resid at `site` or None)``."""

    def __init__(self, model: torch.nn.Module, site: str | None) -> None:
        self.model = model
        self.site = None
        if site is not None:
            from surgery.engines.sae import Site

            self.site = Site(model, site)

    def __call__(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.site is not None:
            return self.site.run(batch)
        from surgery.engines.sae import model_inputs

        device = next(self.model.parameters()).device
        return self.model(**model_inputs(batch, device)).logits, None


# --- the reference cache -----------------------------------------------------------------------

def reference_cache(reference: torch.nn.Module, examples: list[dict], tokenizer: Any, settings: TuneSettings,
                    constraint: Constraint | None, progress: Progress) -> dict[str, torch.Tensor]:
    """Per-example reference quantities, rows in example order: ``{side}/logp``, ``{side}/length``
    and ``{side}/<key>`` for each cacheable constraint quantity (side = chosen, rejected)."""
    columns: dict[str, list[torch.Tensor]] = {}
    forward = Forward(reference, None)
    use_constraint = constraint is not None and constraint.cacheable
    total = -(-len(examples) // settings.batch_size)
    with torch.no_grad():
        for batch in progress(make_batches(examples, tokenizer, settings.batch_size, settings.max_tokens), "reference pass", total):
            for side, part in zip(("chosen", "rejected"), split_preference(batch)):
                logits_btv, _ = forward(part)
                logp_b, length_b = sequence_logps(logits_btv, part)
                columns.setdefault(f"{side}/logp", []).append(logp_b.cpu())
                columns.setdefault(f"{side}/length", []).append(length_b.cpu())
                if use_constraint:
                    for key, value in constraint.reference(part).items():
                        columns.setdefault(f"{side}/{key}", []).append(value.detach().float().cpu())
    return {key: torch.cat(values) for key, values in columns.items()}


def rows(cache: dict[str, torch.Tensor], side: str, index_b: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    prefix = f"{side}/"
    return {key[len(prefix):]: value[index_b].to(device) for key, value in cache.items() if key.startswith(prefix)}


# --- checkpoints -------------------------------------------------------------------------------

class ResumeStore:
    """Checkpoints in ``directory``; only a checkpoint written under the same ``key`` is resumed."""

    STATE = "state.json"

    def __init__(self, directory: Path, key: str) -> None:
        self.directory = Path(directory)
        self.key = key

    def load(self) -> dict[str, Any] | None:
        state_file = self.directory / self.STATE
        if not state_file.is_file():
            return None
        state = read_json(state_file)
        if state.get("key") != self.key:
            return None
        folder = self.directory / state["folder"]
        return {
            "step": state["step"], "history": state["history"],
            "policy": read_tensors(folder / "policy.safetensors"),
            "optimizer": read_tensors(folder / "optimizer.safetensors"),
            "cache": read_tensors(folder / "reference.safetensors"),
        }

    def save(self, step: int, policy: torch.nn.Module, optimizer: torch.optim.Optimizer,
             cache: dict[str, torch.Tensor], history: dict[str, list]) -> None:
        folder_name = f"ckpt-{step:07d}"
        folder = self.directory / folder_name
        write_tensors(folder / "policy.safetensors", _state_dict(policy))
        write_tensors(folder / "optimizer.safetensors", optimizer_tensors(policy, optimizer))
        write_tensors(folder / "reference.safetensors", cache)
        write_json(self.directory / self.STATE, {"key": self.key, "step": step, "folder": folder_name, "history": history})
        for old in self.directory.glob("ckpt-*"):
            if old.name != folder_name:
                shutil.rmtree(old, ignore_errors=True)

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def _state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # tied weights share storage; safetensors refuses shared tensors, so each name gets its own copy
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW's per-parameter state as named tensors (``<param>/exp_avg`` ...), no pickling."""
    names = {id(p): name for name, p in model.named_parameters()}
    out: dict[str, torch.Tensor] = {}
    for param, state in optimizer.state.items():
        for key, value in state.items():
            out[f"{names[id(param)]}/{key}"] = torch.as_tensor(value).detach().clone()
    return out


def load_optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for key, value in tensors.items():
        name, field_name = key.rsplit("/", 1)
        optimizer.state[params[name]][field_name] = value.to(params[name].device) if value.ndim else value


# --- training ----------------------------------------------------------------------------------

def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def schedule(examples: list[dict], settings: TuneSettings) -> tuple[int, int]:
    """``(steps per epoch, total steps)``."""
    per_epoch = -(-len(examples) // settings.batch_size)
    total = per_epoch * settings.epochs
    return per_epoch, min(total, settings.max_steps) if settings.max_steps else total


def step_batch(examples: list[dict], tokenizer: Any, settings: TuneSettings, step: int) -> tuple[dict, torch.Tensor]:
    """The batch of global ``step`` and the indices of its examples."""
    per_epoch, _ = schedule(examples, settings)
    epoch, within = divmod(step, per_epoch)
    index_b = epoch_order(len(examples), settings.seed, epoch)[within * settings.batch_size:(within + 1) * settings.batch_size]
    chunk = [examples[i] for i in index_b.tolist()]
    return next(make_batches(chunk, tokenizer, len(chunk), settings.max_tokens)), index_b


class PreferenceLoss:
    """The per-row loss of one preference batch under ``settings.loss``."""

    def __init__(self, settings: TuneSettings, policy: torch.nn.Module, reference: torch.nn.Module | None,
                 constraint: Constraint | None) -> None:
        self.settings = settings
        self.constraint = constraint
        self.policy_forward = Forward(policy, constraint.site if constraint is not None else None)
        self.reference_forward = Forward(reference, None) if reference is not None else None

    def __call__(self, batch: dict, cache: dict[str, torch.Tensor], index_b: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        s, beta = self.settings, self.settings.effective_beta
        parts = dict(zip(("chosen", "rejected"), split_preference(batch)))
        out: dict[str, dict[str, torch.Tensor]] = {}
        for side, part in parts.items():
            logits_btv, resid_btd = self.policy_forward(part)
            device = logits_btv.device
            ref = rows(cache, side, index_b, device)
            logp_b, length_b = sequence_logps(logits_btv, part)
            out[side] = {"logp": logp_b, "length": length_b.clamp(min=1), "logratio": logp_b - ref["logp"]}
            if self.constraint is not None:
                if not self.constraint.cacheable:
                    with torch.no_grad():
                        ref = {**ref, **self.constraint.reference(part)}
                out[side]["constraint"] = self.constraint.from_outputs(logits_btv, resid_btd, part, ref)
        w, l = out["chosen"], out["rejected"]
        if s.loss == "dpo":
            loss_b = dpo_loss(w["logratio"], l["logratio"], beta)
            margin_b = w["logratio"] - l["logratio"]
        elif s.loss == "simpo":
            loss_b = simpo_loss(w["logp"] / w["length"], l["logp"] / l["length"], beta, s.gamma)
            margin_b = w["logp"] / w["length"] - l["logp"] / l["length"]
        elif s.loss in ("tdpo1", "tdpo2"):
            loss_b = tdpo_loss(w["logratio"], l["logratio"], w["constraint"], l["constraint"], beta, s.alpha, int(s.loss[-1]))
            margin_b = w["logratio"] - l["logratio"]
        else:
            loss_b = fpo_loss(w["logratio"] / w["length"], l["logratio"] / l["length"], w["constraint"], l["constraint"], beta, s.alpha)
            margin_b = w["logratio"] / w["length"] - l["logratio"] / l["length"]
        metrics = {"margin": margin_b.detach()}
        if self.constraint is not None:
            metrics["constraint_chosen"] = w["constraint"].detach()
        return loss_b, metrics


def train(policy: torch.nn.Module, reference: torch.nn.Module, examples: list[dict], tokenizer: Any,
          settings: TuneSettings, constraint: Constraint | None, store: ResumeStore | None,
          progress: Progress, log: Callable[[str], None] = lambda message: None) -> dict[str, list]:
    """Train ``policy`` in place; returns the history (loss, margin, lr per step)."""
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=settings.lr,
                                  weight_decay=settings.weight_decay)
    resumed = store.load() if store is not None else None
    if resumed is not None:
        policy.load_state_dict(resumed["policy"])
        load_optimizer_tensors(policy, optimizer, resumed["optimizer"])
        cache, history, start = resumed["cache"], resumed["history"], resumed["step"]
        log(f"resumed from step {start}")
    else:
        cache = reference_cache(reference, examples, tokenizer, settings, constraint, progress)
        history, start = {"loss": [], "margin": [], "lr": []}, 0
    needs_reference_logits = constraint is not None and not constraint.cacheable
    loss_fn = PreferenceLoss(settings, policy, reference if needs_reference_logits else None, constraint)
    _, total = schedule(examples, settings)
    for step in progress(range(start, total), "preference steps", total - start):
        batch, index_b = step_batch(examples, tokenizer, settings, step)
        lr = settings.lr * min(1.0, (step + 1) / max(1, settings.warmup_steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_b, metrics = loss_fn(batch, cache, index_b)
        loss = loss_b.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if settings.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(policy.parameters(), settings.grad_clip)
        optimizer.step()
        history["loss"].append(loss.item())
        history["margin"].append(float(metrics["margin"].mean()))
        history["lr"].append(lr)
        done = step + 1
        if store is not None and settings.checkpoint_every and done % settings.checkpoint_every == 0 and done < total:
            store.save(done, policy, optimizer, cache, history)
    return history


# --- drift and preference accuracy ---------------------------------------------------------------

@torch.no_grad()
def mean_token_kl(policy: torch.nn.Module, reference: torch.nn.Module, batches: Iterable[dict]) -> float:
    """Mean of ``KL(p_ref || p_policy)`` over the positions that predict response tokens (every real
    token when the batches have no answer mask): how far the policy drifted from the reference."""
    total, count = 0.0, 0
    for batch in batches:
        policy_logits, _ = Forward(policy, None)(batch)
        reference_logits, _ = Forward(reference, None)(batch)
        keep_bt = shifted_mask(batch["input_ids"], batch["attention_mask"], batch.get("answer_mask")).to(policy_logits.device)
        kl_bt = kl_per_position(policy_logits[:, :-1], reference_logits[:, :-1].to(policy_logits.device))
        total += float(kl_bt[keep_bt].sum())
        count += int(keep_bt.sum())
    return total / max(count, 1)


@torch.no_grad()
def preference_accuracy(policy: torch.nn.Module, examples: list[dict], tokenizer: Any, settings: TuneSettings) -> float:
    """Share of pairs whose chosen response the policy gives a higher mean log-probability."""
    wins = 0
    for batch in make_batches(examples, tokenizer, settings.batch_size, settings.max_tokens):
        chosen, rejected = split_preference(batch)
        logp = []
        for part in (chosen, rejected):
            logits_btv, _ = Forward(policy, None)(part)
            total_b, length_b = sequence_logps(logits_btv, part)
            logp.append(total_b / length_b.clamp(min=1))
        wins += int((logp[0] > logp[1]).sum())
    return wins / len(examples)


def chosen_texts(examples: list[dict]) -> Iterator[dict]:
    """The chosen side of preference examples as prompt/answer examples (for drift on the data)."""
    for example in examples:
        yield {"prompt": example["prompt"], "answer": example["chosen"]}


def settings_dict(settings: TuneSettings) -> dict[str, Any]:
    return asdict(settings)
