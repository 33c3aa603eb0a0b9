"""Sparse autoencoders as a recipe step (``capture: {plugin: sae}``) and the ``surgery sae`` commands.

The step trains a TopK or ReLU+L1 SAE (:mod:`surgery.engines.sae`) on the residual stream after block
``layer`` of the step's first model, streamed over the step's data (preference data: the prompt
and chosen response), evaluates it (explained
variance, L0, dead features, CE-loss recovered) and writes it in SAELens' folder format under
``<step>/sae/``. The artifact carries the same weights (``"<model>/<layer>/W_enc"`` ...) and the
``cfg.json`` content in ``meta["cfg"]``, so later steps (``constrain: {plugin: fpo}``,
``tune: {plugin: preference, loss: fpo}``) find it without a path.

Commands: ``surgery sae train`` (the same, from the command line), ``surgery sae explain`` (top
activating windows and explainer prompts, :mod:`surgery.engines.explain`) and ``surgery sae
score-explanation`` (Pearson correlation of simulated vs true activations).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import click
import torch
from pydantic import Field

from surgery import hookimpl
from surgery.core.artifacts import Artifact
from surgery.core.options import Options, check_at_most
from surgery.engines.sae import (
    SAEConfig, SAEError, Site, SparseAutoencoder, TrainConfig, ce_loss_recovered, evaluate_sae, layer_index, save_sae,
    site_activations, site_path, summary, train_sae
)
from surgery.models.adapters import ModelView

SAE_FOLDER = "sae"


class SAEOptions(Options):
    layer: int = Field(-1, description="decoder block whose output (the residual stream) the SAE reads; -1 = last")
    architecture: Literal["topk", "standard"] = Field("topk", description="topk (TopK activation) or standard (ReLU + L1)")
    expansion: int = Field(8, ge=1, description="features per residual dimension (d_sae = expansion * d_in)")
    k: int = Field(16, ge=1, description="topk: active features per token")
    l1_coefficient: float = Field(1.0, ge=0, description="standard: weight of the L1 penalty (scale with the residual's norm)")
    epochs: int = Field(8, ge=1, description="passes over the data")
    lr: float = Field(2e-3, gt=0, description="Adam learning rate")
    minibatch_tokens: int = Field(256, ge=1, description="tokens per optimiser step")
    eval_data: str | None = Field(None, description="recipe data to evaluate on (default: the training data)")


def train_for_model(model: torch.nn.Module, model_view: ModelView, model_name: str, options: SAEOptions, seed: int,
                    train_batches: Callable[[], Iterable[dict]], eval_batches: Callable[[], Iterable[dict]],
                    progress: Callable[..., Iterable] = lambda it, *a, **k: it) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """Train, evaluate and describe an SAE on ``model``'s residual stream after ``options.layer``."""
    path = site_path(model_view, options.layer)
    site = Site(model, path)
    stream = site_activations(site, train_batches)
    first = next(iter(stream()), None)
    if first is None or first.shape[0] == 0:
        raise SAEError("the data gives no tokens to train the SAE on")
    d_in = first.shape[-1]
    if options.architecture == "topk":
        check_at_most(options.k, options.expansion * d_in, "k", f"features of this SAE (expansion {options.expansion} x {d_in})")
    cfg = SAEConfig(d_in=d_in, d_sae=options.expansion * d_in, architecture=options.architecture, k=min(options.k, options.expansion * d_in),
                    l1_coefficient=options.l1_coefficient, hook_name=path, hook_layer=layer_index(model_view, options.layer),
                    model_name=model_name)
    train = TrainConfig(epochs=options.epochs, lr=options.lr, minibatch_tokens=options.minibatch_tokens, seed=seed)
    sae, history = train_sae(cfg, stream, train, progress)
    figures: dict[str, Any] = evaluate_sae(sae, site_activations(site, eval_batches)()).figures()
    if model_view.causal:
        figures.update(ce_loss_recovered(site, sae, eval_batches()))
    figures.update(summary(history))
    sae.cfg.extra = {key: (None if isinstance(v, float) and math.isnan(v) else v) for key, v in figures.items()}
    return sae, figures


def sequences(batch: dict) -> dict:
    """A batch of plain sequences: the chosen side of a preference batch, else the batch itself."""
    if "chosen_input_ids" in batch:
        from surgery.models.data import split_preference

        return split_preference(batch)[0]
    return batch


class SAEPlugin:
    """Sparse autoencoder (TopK or ReLU+L1) on a layer's residual stream, saved in SAELens format."""

    @hookimpl
    def option_schema(self, stage: str):
        return SAEOptions if stage == "capture" else None

    @hookimpl
    def capture(self, ctx) -> Artifact:
        name = ctx.models[0]
        loaded = ctx.model(name)
        o = ctx.options
        eval_data = o.eval_data or ctx.step.data

        def batches_of(data: str | None) -> Callable[[], Iterable[dict]]:
            return lambda: (sequences(batch) for batch in ctx.batches(loaded.tokenizer, data=data))

        sae, figures = train_for_model(loaded.module, loaded.view, name, o, ctx.seed, batches_of(ctx.step.data), batches_of(eval_data), ctx.progress)
        folder = save_sae(sae, ctx.out_dir / SAE_FOLDER)
        prefix = f"{name}/{sae.cfg.hook_layer}/"
        tensors = {prefix + key: value.detach() for key, value in sae.state_dict().items()}
        meta = {"kind": "sae", "model": name, "layer": sae.cfg.hook_layer, "prefix": prefix, "folder": folder.name,
                "cfg": sae.cfg.to_saelens()}
        ctx.log(f"SAE on {name} layer {sae.cfg.hook_layer}: " + ", ".join(f"{k}={v:.4g}" for k, v in figures.items() if isinstance(v, float)))
        return Artifact(tensors=tensors, meta=meta, figures=figures)

    @hookimpl
    def register_commands(self, cli: click.Group) -> None:
        cli.add_command(sae_group)


sae = SAEPlugin()


# --- commands ------------------------------------------------------------------------------------

def _data_options(fn):
    fn = click.option("--data-option", "data_options", multiple=True, metavar="KEY=VALUE", help="A data source option, e.g. tasks=copy.")(fn)
    fn = click.option("--batch-size", default=16, show_default=True, help="Sequences per batch.")(fn)
    fn = click.option("--max-tokens", default=64, show_default=True, help="Tokens per sequence.")(fn)
    fn = click.option("--max-samples", default=256, show_default=True, help="Sequences to use.")(fn)
    fn = click.option("--path", "data_path", default=None, help="Data file for sources that read one.")(fn)
    fn = click.option("--source", default="stdlib-text", show_default=True, help="Data source (e.g. synthetic, stdlib-text, jsonl).")(fn)
    return fn


def _registries():
    """The registries of this command's plugin manager."""
    return click.get_current_context().obj.registries


def _load(model_ref: str, device: str):
    from surgery.models.loading import load_model, parse_model_spec

    registries = _registries()
    return load_model("model", parse_model_spec(model_ref, Path.cwd(), registries.models), registries, device)


def _examples(source: str, data_path: str | None, max_samples: int, max_tokens: int, batch_size: int,
              data_options: tuple[str, ...], seed: int) -> tuple[list[dict], Any]:
    import yaml

    from surgery.models.data import load_examples, parse_data_spec

    raw: dict[str, Any] = {"source": source, "max_samples": max_samples, "max_tokens": max_tokens, "batch_size": batch_size}
    if data_path:
        raw["path"] = data_path
    for item in data_options:
        if "=" not in item:
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE", param_hint="--data-option")
        key, value = item.split("=", 1)
        raw[key] = yaml.safe_load(value)
    sources = _registries().data_sources
    spec = parse_data_spec(raw, sources, Path.cwd())
    return load_examples(spec, seed, sources), spec


@click.group("sae")
def sae_group() -> None:
    """Train sparse autoencoders, export feature explanations, score simulated explanations."""


@sae_group.command("train")
@click.argument("model")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="SAE folder to write (SAELens format).")
@click.option("--layer", default=-1, show_default=True, help="Decoder block whose output the SAE reads.")
@click.option("--architecture", type=click.Choice(["topk", "standard"]), default="topk", show_default=True)
@click.option("--expansion", default=8, show_default=True, help="d_sae / d_in.")
@click.option("--k", default=16, show_default=True, help="TopK: active features per token.")
@click.option("--l1-coefficient", default=1.0, show_default=True, help="Standard SAE: L1 weight.")
@click.option("--epochs", default=8, show_default=True)
@click.option("--lr", default=2e-3, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@_data_options
def train_command(model: str, out_dir: str, layer: int, architecture: str, expansion: int, k: int, l1_coefficient: float,
                  epochs: int, lr: float, seed: int, device: str, source: str, data_path: str | None, max_samples: int,
                  max_tokens: int, batch_size: int, data_options: tuple[str, ...]) -> None:
    """Train an SAE on MODEL's residual stream and save it in SAELens' folder format."""
    from surgery.models.data import batches

    loaded = _load(model, device)
    examples, _ = _examples(source, data_path, max_samples, max_tokens, batch_size, data_options, seed)
    options = SAEOptions(layer=layer, architecture=architecture, expansion=expansion, k=k, l1_coefficient=l1_coefficient,
                         epochs=epochs, lr=lr)
    stream = lambda: batches(examples, loaded.tokenizer, batch_size, max_tokens)  # noqa: E731
    sae_model, figures = train_for_model(loaded.module, loaded.view, model, options, seed, stream, stream)
    save_sae(sae_model, out_dir)
    for key, value in figures.items():
        click.echo(f"{key:<24} {value:.4g}" if isinstance(value, float) else f"{key:<24} {value}")
    click.echo(f"wrote {out_dir}")


@sae_group.command("explain")
@click.argument("sae_dir", type=click.Path(file_okay=False))
@click.argument("model")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for features.json and prompts/.")
@click.option("--features", default=None, help="Comma-separated feature ids (default: every feature that fires).")
@click.option("--limit", default=50, show_default=True, help="At most this many features, strongest first.")
@click.option("--top", default=5, show_default=True, help="Records per feature.")
@click.option("--window", default=16, show_default=True, help="Tokens per record.")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@_data_options
def explain_command(sae_dir: str, model: str, out_dir: str, features: str | None, limit: int, top: int, window: int,
                    seed: int, device: str, source: str, data_path: str | None, max_samples: int, max_tokens: int,
                    batch_size: int, data_options: tuple[str, ...]) -> None:
    """Export each feature's top-activating windows and its explainer prompt (seed 002's layout)."""
    from surgery.core.io import write_json, write_text
    from surgery.engines import explain
    from surgery.engines.sae import check_site, load_sae
    from surgery.models.data import batches

    loaded = _load(model, device)
    sae_model = load_sae(sae_dir, device)
    site = Site(loaded.module, check_site(sae_model, loaded.module, loaded.view))
    wanted = [int(f) for f in features.split(",")] if features else list(range(sae_model.cfg.d_sae))
    if any(not 0 <= f < sae_model.cfg.d_sae for f in wanted):
        raise click.BadParameter(f"feature ids must be in 0..{sae_model.cfg.d_sae - 1}", param_hint="--features")
    examples, _ = _examples(source, data_path, max_samples, max_tokens, batch_size, data_options, seed)
    collector = explain.TopWindows(wanted, top, window)
    with torch.no_grad():
        for batch in batches(examples, loaded.tokenizer, batch_size, max_tokens):
            _, resid_btd = site.run(batch)
            features_btf = sae_model.encode(resid_btd.float())[..., wanted]
            tokens = [loaded.tokenizer.convert_ids_to_tokens(row.tolist()) for row in batch["input_ids"]]
            collector.add(features_btf, tokens, batch["attention_mask"])
    kept = sorted((f for f in collector.result() if f.records), key=lambda f: -f.max_activation)[:limit]
    kept.sort(key=lambda f: f.feature)
    write_json(Path(out_dir) / "features.json", explain.export_json(kept))
    for feature in kept:
        write_text(Path(out_dir) / "prompts" / f"neuron_{feature.feature}.txt", explain.explain_prompt(feature) + "\n")
    click.echo(f"exported {len(kept)} features to {out_dir}")


@sae_group.command("score-explanation")
@click.argument("export_json", type=click.Path(dir_okay=False))
@click.argument("simulated", type=click.Path(dir_okay=False))
def score_command(export_json: str, simulated: str) -> None:
    """Pearson correlation of SIMULATED activations with the exported true ones, per feature.

    SIMULATED holds ``Neuron N`` lines followed by ``<start>`` / ``token<TAB>value`` / ``<end>``
    records, in the export's order.
    """
    from surgery.core.io import read_json
    from surgery.engines import explain

    for path in (export_json, simulated):
        if not Path(path).is_file():
            raise explain.ExplainError("file not found", where=path)
    try:
        data = read_json(export_json)
    except ValueError as exc:
        raise explain.ExplainError(f"not JSON: {exc}", where=export_json) from None
    exported = {f.feature: f for f in explain.features_from_json(data, export_json)}
    runs = explain.parse_simulation(Path(simulated).read_text(encoding="utf-8"), simulated)
    if not runs:
        raise explain.ExplainError("no 'Neuron N' sections", where=simulated)
    for feature_id, records in runs.items():
        if feature_id not in exported:
            raise explain.ExplainError(f"neuron {feature_id} is not in the export", where=simulated)
        score = explain.score_feature(exported[feature_id], records, where=simulated)
        click.echo(f"neuron {feature_id}\tr={score:.4f}")
