"""FPO and friends: drift constraints (``constrain``) and preference optimisation (``tune``), DESIGN §2.6.

Constraints (``constrain`` plugins; each returns an object with ``penalty(policy_model, batch) ->
Tensor[B]``, 0 when the policy equals the reference, against the recipe model named by
``reference``, default the step's first model):

- ``fpo``: SAE features of the residual stream at the SAE's site, pooled over each row's real
  response tokens (divided by their count), mean squared difference over
  ``topk(policy) U topk(reference)``. The reference's pooled features are computed once per batch
  content and cached.
- ``seqkl``: TDPO's ``sum_t KL(p_ref,t || p_theta,t)`` over the response positions.
- ``logit-mse``: mean squared difference of centred logits over the response positions.

``tune`` plugin ``preference``: DPO, SimPO, TDPO1/2 or FPO on ``{prompt, chosen, rejected}`` data
(see :mod:`surgery.engines.preference` for the formulas and :mod:`surgery.engines.tuning` for the loop: cached
reference, atomic checkpoints, exact resume). Intended use: heal a pruned or merged model with the
pre-surgery model as the reference.

Data source ``zoo-preference``: synthetic preference pairs from the zoo's tasks, the correct answer
(chosen) against a near miss (rejected: one item of the answer changed).
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from surgery import hookimpl
from surgery.core.artifacts import Artifact
from surgery.core.errors import DataError, RecipeError
from surgery.core.options import Options, check_at_most
from surgery.engines import preference as po
from surgery.engines.sae import SparseAutoencoder, load_sae, model_inputs
from surgery.models.adapters import view

Loss = Literal["dpo", "simpo", "tdpo1", "tdpo2", "fpo"]  # = surgery.engines.preference.LOSSES


# --- options ---------------------------------------------------------------------------------

class ConstraintOptions(Options):
    reference: str | None = Field(None, description="recipe model the policy is compared with (default: the step's first model)")


class FPOOptions(ConstraintOptions):
    sae: str | None = Field(None, description="SAE folder (SAELens format); default: the latest `capture: {plugin: sae}` step")
    k: int = Field(32, ge=1, description="features kept per side: I = topk(policy) U topk(reference)")


class PreferenceOptions(Options):
    loss: Loss = Field("fpo", description="dpo | simpo | tdpo1 | tdpo2 | fpo")
    reference: str | None = Field(None, description="recipe model used as reference (default: the step's second model, else its first)")
    beta: float | None = Field(None, gt=0, description="inverse temperature (default: 0.1; simpo 2.0)")
    alpha: float = Field(0.5, ge=0, description="weight of the constraint term (tdpo2, fpo)")
    gamma: float = Field(0.5, description="SimPO's target margin")
    sae: str | None = Field(None, description="SAE folder for the fpo loss (default: the latest sae capture step)")
    k: int = Field(32, ge=1, description="fpo: features kept per side")
    lr: float = Field(5e-5, gt=0, description="AdamW learning rate (after warm-up)")
    warmup_steps: int = Field(10, ge=0, description="linear warm-up steps")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    epochs: int = Field(1, ge=1, description="passes over the preference data")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimiser steps")
    batch_size: int | None = Field(None, ge=1, description="pairs per step (default: the data entry's batch_size)")
    grad_clip: float = Field(1.0, ge=0, description="gradient-norm clip (0: off)")
    checkpoint_every: int = Field(50, ge=1, description="write a resumable checkpoint every N steps")
    drift_data: str | None = Field(None, description="recipe data on which drift KL(ref || policy) is measured (default: the chosen responses)")


class ZooPreferenceOptions(Options):
    tasks: str | list[str] = Field("synthetic-mix", description="zoo task names or a mix name")
    samples: int = Field(256, ge=1, description="pairs to generate")
    split: Literal["train", "test"] = Field("train", description="which side of the zoo's content split to draw from")


# --- constraint objects --------------------------------------------------------------------------

class LogitConstraint:
    """A constraint on the policy's logits against the reference's (seqkl, logit-mse)."""

    site = None
    cacheable = False  # the reference's T x V logits are recomputed for every batch

    def __init__(self, reference: torch.nn.Module, measure) -> None:
        self.reference_model = reference
        self.measure = measure

    @torch.no_grad()
    def reference(self, batch: dict) -> dict[str, torch.Tensor]:
        device = next(self.reference_model.parameters()).device
        return {"logits": self.reference_model(**model_inputs(batch, device)).logits}

    def from_outputs(self, logits_btv: torch.Tensor, resid_btd: torch.Tensor | None, batch: dict,
                     reference: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.measure(logits_btv, reference["logits"], batch)

    def penalty(self, policy_model: torch.nn.Module, batch: dict) -> torch.Tensor:
        device = next(policy_model.parameters()).device
        logits_btv = policy_model(**model_inputs(batch, device)).logits
        return self.from_outputs(logits_btv, None, batch, self.reference(batch))


class FeatureConstraint:
    """FPO's feature-level constraint through an SAE at ``site`` (a block's output path)."""

    cacheable = True

    def __init__(self, reference: torch.nn.Module, sae: SparseAutoencoder, site: str, k: int) -> None:
        from surgery.engines.sae import Site

        device = next(reference.parameters()).device
        self.sae = sae.to(device).eval().requires_grad_(False)
        self.site = site
        self.k = k
        self.reference_site = Site(reference, site)
        self._policy_site: Site | None = None
        self._cache: dict[str, dict[str, torch.Tensor]] = {}

    def pooled(self, resid_btd: torch.Tensor, batch: dict) -> torch.Tensor:
        """``[B, F]`` SAE features pooled over each row's real response tokens."""
        features_btf = self.sae.encode(resid_btd.float())
        return po.pool_features(features_btf, po.response_token_mask(batch))

    @torch.no_grad()
    def reference(self, batch: dict) -> dict[str, torch.Tensor]:
        key = batch_key(batch)
        if key not in self._cache:
            _, resid_btd = self.reference_site.run(batch)
            self._cache[key] = {"features": self.pooled(resid_btd, batch)}
        return self._cache[key]

    def from_outputs(self, logits_btv: torch.Tensor, resid_btd: torch.Tensor | None, batch: dict,
                     reference: dict[str, torch.Tensor]) -> torch.Tensor:
        if resid_btd is None:
            raise ValueError("the fpo constraint needs the policy's residual stream at the SAE site")
        return po.fpo_constraint(self.pooled(resid_btd, batch), reference["features"], self.k)

    def penalty(self, policy_model: torch.nn.Module, batch: dict) -> torch.Tensor:
        from surgery.engines.sae import Site

        if self._policy_site is None or self._policy_site.model is not policy_model:
            self._policy_site = Site(policy_model, self.site)  # only the latest: never keeps old models alive
        logits_btv, resid_btd = self._policy_site.run(batch)
        return self.from_outputs(logits_btv, resid_btd, batch, self.reference(batch))


def batch_key(batch: dict) -> str:
    """A content hash of a batch's token tensors (the reference cache's key)."""
    digest = hashlib.sha1()
    for name in ("input_ids", "attention_mask", "answer_mask"):
        if batch.get(name) is not None:
            tensor = batch[name].detach().cpu().contiguous()
            digest.update(name.encode() + str(tuple(tensor.shape)).encode() + tensor.numpy().tobytes())
    return digest.hexdigest()


# --- plugins -------------------------------------------------------------------------------------

def _reference_model(ctx, name: str | None) -> torch.nn.Module:
    name = name or ctx.models[0]
    if name not in ctx.run.recipe.models and name not in ctx.run.produced:
        raise RecipeError(f"{ctx.where}.reference: unknown model {name!r}")
    return ctx.model(name).module


def resolve_sae(ctx, path: str | None) -> SparseAutoencoder:
    """The SAE at ``path`` (relative to the recipe file), else the latest ``sae`` capture step's."""
    if path is not None:
        folder = Path(path).expanduser()
        if not folder.is_absolute():
            folder = ctx.run.recipe.base_dir / folder
        return load_sae(folder, ctx.device)
    try:
        artifact = ctx.upstream("capture")
    except Exception:
        raise RecipeError(f"{ctx.where}.sae: give an SAE folder, or put a `capture: {{plugin: sae}}` step before this one") from None
    from surgery.engines.sae import sae_from_artifact

    return sae_from_artifact(artifact, where=ctx.where).to(ctx.device)


class FPO:
    """FPO constraint: MSE of pooled SAE features over topk(policy) U topk(reference)."""

    @hookimpl
    def option_schema(self, stage: str):
        return FPOOptions if stage == "constrain" else None

    @hookimpl
    def constrain(self, ctx) -> FeatureConstraint:
        reference = _reference_model(ctx, ctx.options.reference)
        sae = resolve_sae(ctx, ctx.options.sae)
        from surgery.engines.sae import check_site

        site = check_site(sae, reference, view(reference, ctx.registries.architectures), where=ctx.where)
        check_at_most(ctx.options.k, sae.cfg.d_sae, f"{ctx.where}.k", "features of the SAE")
        return FeatureConstraint(reference, sae, site, ctx.options.k)


class SeqKL:
    """TDPO's sequence KL: sum over response tokens of KL(p_ref || p_theta)."""

    @hookimpl
    def option_schema(self, stage: str):
        return ConstraintOptions if stage == "constrain" else None

    @hookimpl
    def constrain(self, ctx) -> LogitConstraint:
        return LogitConstraint(_reference_model(ctx, ctx.options.reference), po.seqkl)


class LogitMSE:
    """Mean squared difference of centred logits over response tokens (the cheapest drift baseline)."""

    @hookimpl
    def option_schema(self, stage: str):
        return ConstraintOptions if stage == "constrain" else None

    @hookimpl
    def constrain(self, ctx) -> LogitConstraint:
        return LogitConstraint(_reference_model(ctx, ctx.options.reference), po.logit_mse)


class Preference:
    """Preference optimisation (DPO, SimPO, TDPO1/2, FPO) that heals a surgered model against a reference."""

    @hookimpl
    def option_schema(self, stage: str):
        return PreferenceOptions if stage == "tune" else None

    @hookimpl
    def register_data_sources(self, register) -> None:
        register("zoo-preference", load_zoo_preference, ZooPreferenceOptions)

    @hookimpl
    def tune(self, ctx) -> Artifact:
        return run_tune(ctx)


def run_tune(ctx) -> Artifact:
    """Load a fresh copy of the policy, train it against the reference, save it, report figures."""
    from surgery.engines import tuning
    from surgery.models.data import example_kind

    o = ctx.options
    policy_name = ctx.models[0]
    reference_name = o.reference or (ctx.models[1] if len(ctx.models) > 1 else policy_name)
    examples = ctx.examples()
    if example_kind(examples) != "preference":
        raise DataError(f"{ctx.where}: the preference step needs {{prompt, chosen, rejected}} examples (data {ctx.step.data!r})")
    spec = ctx.run.recipe.data[ctx.step.data]
    settings = tuning.TuneSettings(
        loss=o.loss, beta=o.beta, alpha=o.alpha, gamma=o.gamma, lr=o.lr, warmup_steps=o.warmup_steps,
        weight_decay=o.weight_decay, epochs=o.epochs, max_steps=o.max_steps, batch_size=o.batch_size or spec.batch_size,
        max_tokens=spec.max_tokens, grad_clip=o.grad_clip, checkpoint_every=o.checkpoint_every, seed=ctx.seed,
    )
    reference = ctx.model(reference_name).module
    policy, tokenizer = _fresh_policy(ctx, policy_name)
    constraint = _loss_constraint(ctx, o, reference_name)
    store = tuning.ResumeStore(ctx.out_dir.parent / f".{ctx.index:02d}-{ctx.stage}-{ctx.plugin}.resume", _resume_key(ctx))
    accuracy_before = tuning.preference_accuracy(policy, examples, tokenizer, settings)
    history = tuning.train(policy, reference, examples, tokenizer, settings, constraint, store, ctx.progress, ctx.log)
    policy.eval()
    figures = {
        "loss_first": history["loss"][0] if history["loss"] else float("nan"),
        "loss_last": sum(history["loss"][-10:]) / max(1, len(history["loss"][-10:])),
        "steps": len(history["loss"]),
        "pref_accuracy_before": accuracy_before,
        "pref_accuracy_after": tuning.preference_accuracy(policy, examples, tokenizer, settings),
        "drift_kl": tuning.mean_token_kl(policy, reference, _drift_batches(ctx, o, examples, tokenizer, settings)),
    }
    feature_drift = _feature_drift(ctx, o, reference_name, policy, examples, tokenizer, settings)
    if feature_drift is not None:
        figures["drift_fpo"] = feature_drift
    ctx.save_model(policy, like=policy_name)
    store.clear()
    tensors = {key: torch.tensor(values, dtype=torch.float32) for key, values in history.items() if values}
    meta = {"loss": o.loss, "policy": policy_name, "reference": reference_name, "beta": settings.effective_beta,
            "alpha": o.alpha}
    return Artifact(tensors=tensors, meta=meta, figures=figures)


def _fresh_policy(ctx, name: str) -> tuple[torch.nn.Module, Any]:
    """A trainable copy of model ``name``, loaded anew so the run's shared copy stays untouched."""
    from surgery.models.loading import ModelSpec, load_model

    spec = ModelSpec(path=str(ctx.model_path(name))) if name in ctx.run.produced else ctx.run.recipe.models[name]
    loaded = load_model(name, spec, ctx.registries, ctx.device)
    if loaded.tokenizer is None:
        raise RecipeError(f"{ctx.where}: model {name!r} has no tokenizer to encode the preference data")
    try:  # zoo models made bidirectional need their switches re-applied after loading
        from surgery.models.zoo.architectures import prepare_for_inference

        prepare_for_inference(loaded.module)
    except ImportError:
        pass
    return loaded.module, loaded.tokenizer


def _loss_constraint(ctx, o: PreferenceOptions, reference_name: str):
    if o.loss in ("tdpo1", "tdpo2"):
        return ctx.call("constrain", "seqkl", {"reference": reference_name})
    if o.loss == "fpo":
        return ctx.call("constrain", "fpo", {"reference": reference_name, "sae": o.sae, "k": o.k})
    return None


def _drift_batches(ctx, o: PreferenceOptions, examples: list[dict], tokenizer: Any, settings) -> list[dict]:
    from surgery.engines import tuning
    from surgery.models.data import batches

    if o.drift_data is not None:
        return list(ctx.batches(tokenizer, data=o.drift_data))
    return list(batches(list(tuning.chosen_texts(examples)), tokenizer, settings.batch_size, settings.max_tokens))


@torch.no_grad()
def _feature_drift(ctx, o: PreferenceOptions, reference_name: str, policy, examples, tokenizer, settings) -> float | None:
    """Mean FPO constraint of the chosen responses, whatever the loss, when an SAE is at hand."""
    from surgery.models.data import batches, split_preference

    if o.sae is None and not _has_upstream_sae(ctx):
        return None
    constraint = ctx.call("constrain", "fpo", {"reference": reference_name, "sae": o.sae, "k": o.k})
    total, count = 0.0, 0
    for batch in batches(examples, tokenizer, settings.batch_size, settings.max_tokens):
        chosen, _ = split_preference(batch)
        total += float(constraint.penalty(policy, chosen).sum())
        count += chosen["input_ids"].shape[0]
    return total / max(count, 1)


def _has_upstream_sae(ctx) -> bool:
    try:
        return ctx.upstream("capture").meta.get("kind") == "sae"
    except Exception:
        return False


def _resume_key(ctx) -> str:
    """What a checkpoint must match to be resumed: options, model identities, data, seed."""
    record = {
        "options": ctx.options.model_dump(mode="json"), "seed": ctx.seed,
        "models": {name: ctx.run.model_fingerprint(name) for name in {*ctx.models, ctx.options.reference or ctx.models[0]}},
        "data": ctx.run.recipe.data[ctx.step.data].model_dump(mode="json"),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


# --- the zoo's synthetic preference pairs -----------------------------------------------------

def load_zoo_preference(spec, seed: int) -> list[dict]:
    """Pairs ``{prompt, chosen, rejected}``: the zoo answer against a near miss of it (responses
start with a space, the separator the zoo's whitespace tokenizer needs after the prompt)."""
    from surgery.models.zoo.tasks import make_examples, resolve_tasks

    if spec.path is not None:
        raise DataError("source 'zoo-preference' takes no 'path'")
    options = spec.options
    tasks = resolve_tasks(options["tasks"])
    if any(task in ("colour", "shape") for task in tasks):
        raise DataError("source 'zoo-preference' covers the text tasks only")
    rng = random.Random(f"zoo-preference/{seed}")
    pairs = []
    for example in make_examples(list(tasks), options["samples"], seed=seed, split=options["split"]):
        rejected = near_miss(example["answer"], example["task"], rng)
        # responses start with the separator, so prompt + response is the text the zoo trains on
        pairs.append({"prompt": example["prompt"], "chosen": " " + example["answer"], "rejected": " " + rejected,
                      "task": example["task"], "text": f"{example['prompt']} {example['answer']}"})
    return pairs


def near_miss(answer: str, task: str, rng: random.Random) -> str:
    """``answer`` with one item replaced by a different value of the same kind."""
    from surgery.models.zoo.tasks import MODULUS, SEQUENCE_ITEMS

    items = answer.split()
    position = rng.randrange(len(items))
    choices = MODULUS if task == "add" else SEQUENCE_ITEMS
    wrong = (int(items[position]) + rng.randrange(1, choices)) % choices
    items[position] = str(wrong)
    return " ".join(items)


fpo = FPO()
seqkl = SeqKL()
logit_mse = LogitMSE()
preference = Preference()
