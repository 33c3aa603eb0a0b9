"""The capture engine: one nnsight trace per batch, folded into streamed, mergeable statistics.

A capture ``plan`` maps group names (usually the layer index, ``"3"``) to :class:`Stream` s. A
stream reads one per-token tensor at a :class:`Site` (a module's first input or its output),
optionally multiplies it by a fixed ``project`` matrix, and names the statistics to fold:

=============  ===================================  ============================================
flag           stored sum (key in :class:`Stats`)   read back with
=============  ===================================  ============================================
``moments``    ``<s>/sum``, ``<s>/sum_sq``          ``mean``, ``second_moment``, ``variance``
``absolute``   ``<s>/sum_abs``                      ``mean_abs``
``cross=(u,)`` ``<s>*<u>/cross`` (sum of w v u)     ``cross_moment``, ``covariance``, ``correlation``
``fisher``     ``<s>/fisher`` (sum of w (dL/dv)^2)  ``fisher``
``sketch``     ``<s>/sketch`` ``[k, F]``            ``sketch`` (centred), :func:`sketch_correlation`
=============  ===================================  ============================================

Every entry is a sum over tokens of ``w_t * f(v_t)`` (plus ``weight`` = sum of w_t and ``count`` =
number of real tokens), so statistics over several batches, processes or probe shards combine by
adding: ``Stats.merge`` and ``Stats.all_reduce`` (torch.distributed) are reductions. Sums are kept
in float64; memory depends on the feature widths, never on the number of tokens.

Token weights ``w_bt`` come from a weighter (``weights(logits_btv, input_ids_bt, mask_bt)``;
uniform = the attention mask) and are zeroed on padding. With ``fisher`` streams the engine
prepares each batch with the ``objective`` (which may mask tokens: the activations are then those
of the prepared input), sums its per-row losses and takes ``dL/dv`` at the site in the same pass.

Sketches: real token j of probe row r gets ``r_t ~ N(0, I_k / k)`` from a generator seeded by
``(seed, r)`` (its j-th draw), so two models run on the same probe rows in the same order see the
same r_t. ``sketch = sum_t sqrt(w_t) r_t v_t`` and ``sketch_basis = sum_t sqrt(w_t) r_t`` give
centred sketches whose column cosines approximate weighted activation correlations, across layers
and across models (with the same token weights: a weighter that depends on each model's logits
gives each model its own weighting). Pass ``batch["row_index"]`` ``[B]`` (global probe-row
indices) when rows are sharded over processes.

Sites must be ``[B, T, ...]`` like the attention mask: text positions. Vision-tower sites (patch
positions) are not captured by this engine. Wrapping a model in nnsight installs a forward wrapper
on each of its modules for the life of the module (a small cost on later untraced calls too).

Example (what a FAM ``capture`` plugin asks for, in one pass per batch)::

    from surgery.engines.capture import Capture, mlp_activations, mlp_inputs, mlp_outputs, mlp_write_projection

    lm = ctx.model(name)
    plan = {
        str(layer.index): [
            mlp_activations(layer, absolute=True, sketch=True, fisher=True, cross=("write",)),
            mlp_inputs(layer),                       # x, the MLP input
            mlp_outputs(layer),                      # y, the down projection's output
            mlp_write_projection(lm.module, layer),  # <y, d_i / |d_i|> for every neuron i
        ]
        for layer in lm.view.layers
    }
    engine = Capture(lm.module, plan, weighter=ctx.weighter(), objective=ctx.objective("causal-lm"),
                     sketch_dim=32, seed=ctx.seed)
    for batch in ctx.progress(ctx.batches(lm.tokenizer), desc=f"capture {name}"):
        engine.add(batch)
    stats = engine.result()["3"]
    stats.mean("act"), stats.mean_abs("act"), stats.mean("x"), stats.mean("y")
    stats.correlation("act", "write"), stats.fisher("act"), stats.sketch("act")   # [k, I]
    tensors = stats.tensors(prefix=f"{name}/3/")   # raw sums: merge artifacts by adding them
"""
from __future__ import annotations

import inspect
import itertools
import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Literal, Mapping, Sequence

import torch

from surgery.core.errors import ModelError
from surgery.models.adapters import LayerView, envoy_at, write_directions

Port = Literal["input", "output"]
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "pixel_values")


@dataclass(frozen=True)
class Site:
    """A per-token tensor ``[B, T, ...]``: the first input of the module at ``path``, or its output
    (the first element when the module returns a tuple)."""

    path: str
    port: Port = "input"


@dataclass(frozen=True, eq=False)
class Stream:
    """A feature stream ``v_t in R^F`` read at ``site`` (flattened past ``[B, T]``; times
    ``project`` ``[F_in, F]`` when given) and the statistics to fold from it."""

    name: str
    site: Site
    project: torch.Tensor | None = None
    moments: bool = True
    absolute: bool = False
    sketch: bool = False
    fisher: bool = False
    cross: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.fisher and self.project is not None:
            raise ValueError(f"stream {self.name!r}: fisher is taken at the site, not on a projection")


# --- streams of a layer ------------------------------------------------------------------------

def mlp_activations(layer: LayerView, **stats: Any) -> Stream:
    """``act``: neuron activations a_i, the down projection's input ``[B, T, I]``."""
    return Stream("act", Site(layer.mlp.down, "input"), **stats)


def mlp_inputs(layer: LayerView, **stats: Any) -> Stream:
    """``x``: the MLP's input ``[B, T, D]`` (the input of its up/gate projection)."""
    return Stream("x", Site(layer.mlp.up or layer.mlp.gate, "input"), **stats)


def mlp_outputs(layer: LayerView, **stats: Any) -> Stream:
    """``y``: the MLP's output ``[B, T, D]`` (the down projection's output)."""
    return Stream("y", Site(layer.mlp.down, "output"), **stats)


def mlp_write_projection(model: torch.nn.Module, layer: LayerView, **stats: Any) -> Stream:
    """``write``: ``<y, d_i / |d_i|>`` for every neuron i ``[B, T, I]``, d_i its write direction."""
    directions_di = write_directions(model, layer.mlp).detach().float()
    units_di = directions_di / directions_di.norm(dim=0, keepdim=True).clamp_min(1e-12)
    return Stream("write", Site(layer.mlp.down, "output"), project=units_di, **stats)


def head_outputs(layer: LayerView, **stats: Any) -> Stream:
    """``heads``: the output projection's input ``[B, T, H * hd]`` (view as ``[.., H, hd]``)."""
    return Stream("heads", Site(layer.attn.out_proj, "input"), **stats)


def residual(layer: LayerView, **stats: Any) -> Stream:
    """``resid``: the residual stream after the layer ``[B, T, D]``."""
    return Stream("resid", Site(layer.path, "output"), **stats)


# --- statistics --------------------------------------------------------------------------------

class Stats:
    """Streamed sums over tokens (float64). Every entry is additive, so ``merge`` is ``+``."""

    def __init__(self, sums: Mapping[str, torch.Tensor] | None = None) -> None:
        self.sums: dict[str, torch.Tensor] = {k: v.detach().to(torch.float64).clone() for k, v in (sums or {}).items()}

    def add(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().to(torch.float64)
        if key in self.sums:
            self.sums[key] += value.to(self.sums[key].device)
        else:
            self.sums[key] = value.clone()

    def merge(self, other: "Stats") -> "Stats":
        """The statistics of the union of both token sets."""
        merged = Stats(self.sums)
        for key, value in other.sums.items():
            merged.add(key, value)
        return merged

    __add__ = merge

    def all_reduce(self, group: Any = None) -> None:
        """Sum every entry over the processes of ``group`` (all must hold the same keys)."""
        import torch.distributed as dist

        for key in sorted(self.sums):
            dist.all_reduce(self.sums[key], op=dist.ReduceOp.SUM, group=group)

    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The raw sums keyed ``prefix + key`` (for an Artifact)."""
        return {prefix + key: value for key, value in self.sums.items()}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], prefix: str = "") -> "Stats":
        return cls({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})

    # --- read back -----------------------------------------------------------------------------
    @property
    def weight(self) -> float:
        return float(self.sums.get("weight", 0.0))

    @property
    def count(self) -> int:
        return int(self.sums.get("count", 0))

    def _normed(self, key: str) -> torch.Tensor:
        if key not in self.sums:
            raise KeyError(f"statistic {key!r} was not captured (have: {', '.join(sorted(self.sums))})")
        return self.sums[key] / max(self.weight, 1e-300)

    def mean(self, name: str) -> torch.Tensor:
        return self._normed(f"{name}/sum")

    def mean_abs(self, name: str) -> torch.Tensor:
        return self._normed(f"{name}/sum_abs")

    def second_moment(self, name: str) -> torch.Tensor:
        return self._normed(f"{name}/sum_sq")

    def variance(self, name: str) -> torch.Tensor:
        return (self.second_moment(name) - self.mean(name) ** 2).clamp_min(0)

    def cross_moment(self, a: str, b: str) -> torch.Tensor:
        key = f"{a}*{b}/cross" if f"{a}*{b}/cross" in self.sums else f"{b}*{a}/cross"
        return self._normed(key)

    def covariance(self, a: str, b: str) -> torch.Tensor:
        return self.cross_moment(a, b) - self.mean(a) * self.mean(b)

    def correlation(self, a: str, b: str) -> torch.Tensor:
        """Weighted Pearson correlation of paired features (0 where either is constant)."""
        scale = (self.variance(a) * self.variance(b)).sqrt()
        rho = self.covariance(a, b) / scale.clamp_min(1e-300)
        return torch.where(scale > 0, rho, torch.zeros_like(rho)).clamp(-1, 1)

    def fisher(self, name: str) -> torch.Tensor:
        """Diagonal Fisher: weighted mean of (dL/dv)^2."""
        return self._normed(f"{name}/fisher")

    def sketch(self, name: str, centered: bool = True) -> torch.Tensor:
        """``[k, F]``: column f approximates the sqrt(w)-weighted per-token vector of feature f."""
        sketch_kf = self.sums[f"{name}/sketch"]
        if not centered:
            return sketch_kf
        return sketch_kf - self.sums["sketch_basis"][:, None] * self.mean(name)[None, :]


def sketch_correlation(sketch_kf: torch.Tensor, sketch_kg: torch.Tensor) -> torch.Tensor:
    """``[F, G]`` cosines of centred sketch columns: approximate activation correlations."""
    a = sketch_kf / sketch_kf.norm(dim=0, keepdim=True).clamp_min(1e-300)
    b = sketch_kg / sketch_kg.norm(dim=0, keepdim=True).clamp_min(1e-300)
    return a.t() @ b


def sketch_basis(mask_bt: torch.Tensor, rows_b: Sequence[int], k: int, seed: int) -> torch.Tensor:
    """``[B, T, k]``: r_t for each real token (0 on padding), seeded by (seed, row), j-th draw."""
    mask_cpu = mask_bt.detach().cpu().bool()
    # only the draws are per row (each row's own seeded stream); the scatter is one masked store,
    # which fills real tokens row by row in position order, the order of the concatenated draws
    draws = [torch.randn(int(n), k, generator=torch.Generator().manual_seed(_row_seed(seed, int(row))))
             for n, row in zip(mask_cpu.sum(1).tolist(), rows_b)]
    basis_btk = torch.zeros(*mask_cpu.shape, k)
    basis_btk[mask_cpu] = torch.cat(draws).mul_(1 / math.sqrt(k))
    return basis_btk.to(mask_bt.device)


def _row_seed(seed: int, row: int) -> int:
    return (seed * 0x9E3779B97F4A7C15 + row * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % (2**63 - 1)


def fold(stats: Stats, streams: Sequence[Stream], values: Mapping[Site, torch.Tensor], w_bt: torch.Tensor,
         mask_bt: torch.Tensor, grads: Mapping[Site, torch.Tensor] | None = None,
         basis_btk: torch.Tensor | None = None) -> None:
    """Add one batch's contribution of ``streams`` to ``stats`` (padding is dropped, never weighed)."""
    real_n = mask_bt.reshape(-1) != 0
    keep = None if bool(real_n.all()) else real_n
    w_n = _rows(w_bt.reshape(-1).float(), keep)
    stats.add("weight", w_n.sum())
    stats.add("count", real_n.sum())
    if any(s.sketch for s in streams):
        root_w_nk = w_n.clamp_min(0).sqrt()[:, None] * _rows(basis_btk.reshape(real_n.shape[0], -1), keep)
        stats.add("sketch_basis", root_w_nk.sum(0))
    features: dict[str, torch.Tensor] = {}
    for stream in streams:
        v_nf = _features(values[stream.site], mask_bt, keep, stream.name)
        if stream.project is not None:
            v_nf = v_nf @ stream.project.to(v_nf.device, v_nf.dtype)
        features[stream.name] = v_nf
        if stream.moments or stream.sketch:
            stats.add(f"{stream.name}/sum", w_n @ v_nf)
            stats.add(f"{stream.name}/sum_sq", w_n @ v_nf.square())
        if stream.absolute:
            stats.add(f"{stream.name}/sum_abs", w_n @ v_nf.abs())
        if stream.sketch:
            stats.add(f"{stream.name}/sketch", root_w_nk.t() @ v_nf)
        if stream.fisher:
            g_nf = _features(grads[stream.site], mask_bt, keep, stream.name)
            stats.add(f"{stream.name}/fisher", w_n @ g_nf.square())
    for stream in streams:
        for other in stream.cross:
            if features[other].shape != features[stream.name].shape:
                raise ValueError(f"streams {stream.name!r} and {other!r} differ in width, so they have no cross term")
            stats.add(f"{stream.name}*{other}/cross", w_n @ (features[stream.name] * features[other]))


def _rows(x_n: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    return x_n if keep is None else x_n[keep]


def _features(value: torch.Tensor, mask_bt: torch.Tensor, keep: torch.Tensor | None, name: str) -> torch.Tensor:
    if value.shape[:2] != mask_bt.shape:
        raise ModelError(f"stream {name!r}: site tensor {tuple(value.shape)} is not [batch, tokens, ...] "
                         f"like the attention mask {tuple(mask_bt.shape)}")
    return _rows(value.reshape(mask_bt.numel(), -1).float(), keep)


# --- the engine --------------------------------------------------------------------------------

class Capture:
    """Streams ``plan``'s statistics of ``model`` over batches, one nnsight trace per batch."""

    def __init__(self, model: torch.nn.Module, plan: Mapping[str, Sequence[Stream]], *, weighter: Any = None,
                 objective: Any = None, sketch_dim: int = 32, seed: int = 0) -> None:
        from nnsight import NNsight

        self.model = model
        self.plan = {group: tuple(streams) for group, streams in plan.items()}
        self.weighter = weighter
        self.objective = objective
        self.sketch_dim = sketch_dim
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.stats = {group: Stats() for group in self.plan}
        self.rows_seen = 0
        _check_plan(self.plan, objective)
        streams = [s for group in self.plan.values() for s in group]
        self.sites = _in_execution_order(model, {s.site for s in streams})
        self.grad_sites = {s.site for s in streams if s.fisher}
        self.wants_sketch = any(s.sketch for s in streams)
        with warnings.catch_warnings():  # nnsight warns about BERT's child module named `output`
            warnings.simplefilter("ignore")
            self.traced = NNsight(model)
        self.envoys = {site: envoy_at(self.traced, site.path) for site in self.sites}
        # no key/value cache: a capture never generates, and the cache costs memory in every layer
        self.extra_inputs = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}

    def add(self, batch: dict) -> None:
        """Run one batch and fold it into ``self.stats``."""
        if self.objective is not None:
            batch = self.objective.prepare(batch, self.generator)
        batch = _to_device(batch, _input_device(self.model))
        values, probes, logits = self._trace(batch)
        mask_bt = batch["attention_mask"]
        w_bt = self._weights(logits, batch, mask_bt)
        grads = self._gradients(probes, logits, batch) if probes else None
        rows_b = batch.get("row_index", range(self.rows_seen, self.rows_seen + mask_bt.shape[0]))
        basis_btk = sketch_basis(mask_bt, rows_b, self.sketch_dim, self.seed) if self.wants_sketch else None
        with torch.no_grad():
            for group, streams in self.plan.items():
                fold(self.stats[group], streams, values, w_bt, mask_bt, grads, basis_btk)
        self.rows_seen += mask_bt.shape[0]

    def result(self) -> dict[str, Stats]:
        """The statistics per group; a NaN or infinite sum is a NumericError (under the recipe's
        ``on_nonfinite: report``, a finding in the run report instead; see :mod:`surgery.core.guards`)."""
        from surgery.core import guards

        for group, stats in self.stats.items():
            for key, value in stats.sums.items():
                if not bool(torch.isfinite(value).all()):
                    guards.flag(f"capture: non-finite {key!r} in group {group!r}")
        return self.stats

    def _trace(self, batch: dict) -> tuple[dict[Site, torch.Tensor], dict[Site, torch.Tensor], torch.Tensor | None]:
        import nnsight

        inputs = {key: batch[key] for key in MODEL_INPUTS if key in batch} | self.extra_inputs
        with torch.set_grad_enabled(bool(self.grad_sites)), self.traced.trace(**inputs):
            values, probes = nnsight.save({}), nnsight.save({})
            for site in self.sites:
                envoy = self.envoys[site]
                raw = envoy.input if site.port == "input" else envoy.output
                value = raw[0] if isinstance(raw, tuple) else raw
                if site in self.grad_sites:  # a zero added at the site: d loss / d probe = d loss / d value
                    probes[site] = torch.zeros_like(value, requires_grad=True)
                    value = value + probes[site]
                    if site.port == "input":
                        envoy.input = value
                    else:
                        envoy.output = (value, *raw[1:]) if isinstance(raw, tuple) else value
                values[site] = value
            output = nnsight.save(self.traced.output)
        logits = getattr(output, "logits", None)
        return values, probes, logits

    def _weights(self, logits: torch.Tensor | None, batch: dict, mask_bt: torch.Tensor) -> torch.Tensor:
        mask_f = mask_bt.to(torch.float32)
        if self.weighter is None:
            return mask_f
        with torch.no_grad():
            w_bt = self.weighter.weights(None if logits is None else logits.detach(), batch["input_ids"], mask_bt)
        return w_bt.detach().to(torch.float32) * mask_f

    def _gradients(self, probes: dict[Site, torch.Tensor], logits: torch.Tensor | None, batch: dict) -> dict[Site, torch.Tensor]:
        if logits is None:
            raise ModelError(f"{type(self.model).__name__} returns no logits, so a Fisher term has no loss")
        loss = self.objective.loss(logits, batch).sum()
        sites = list(probes)
        grads = torch.autograd.grad(loss, [probes[s] for s in sites], allow_unused=True)
        return {s: torch.zeros_like(probes[s]) if g is None else g for s, g in zip(sites, grads)}


def capture(model: torch.nn.Module, batches: Iterable[dict], plan: Mapping[str, Sequence[Stream]], **options: Any) -> dict[str, Stats]:
    """Run :class:`Capture` over ``batches`` and return its statistics per group."""
    engine = Capture(model, plan, **options)
    for batch in batches:
        engine.add(batch)
    return engine.result()


def number_rows(batches: Iterable[dict]) -> Iterator[dict]:
    """The batches with ``row_index`` ``[B]``: each row's global position in the probe set, so a
    capture of any share of them draws the same sketch bases as a capture of all of them."""
    start = 0
    for batch in batches:
        rows = batch["input_ids"].shape[0]
        yield {**batch, "row_index": torch.arange(start, start + rows)}
        start += rows


def _check_plan(plan: Mapping[str, Sequence[Stream]], objective: Any) -> None:
    for group, streams in plan.items():
        names = [s.name for s in streams]
        if len(set(names)) != len(names):
            raise ValueError(f"capture group {group!r}: duplicate stream names {names}")
        for stream in streams:
            if stream.fisher and objective is None:
                raise ValueError(f"capture group {group!r}: stream {stream.name!r} asks for fisher but no objective is given")
            for other in stream.cross:
                if other not in names:
                    raise ValueError(f"capture group {group!r}: stream {stream.name!r} crosses unknown stream {other!r}")


def _in_execution_order(model: torch.nn.Module, sites: set[Site]) -> list[Site]:
    """Sites sorted as a forward pass reaches them, assuming modules run in registration order: a
    module's input comes before its children, its output after them (nnsight requires the order)."""
    counter = itertools.count()
    order: dict[str, tuple[int, int]] = {}

    def visit(module: torch.nn.Module, path: str) -> None:
        enter = next(counter)
        for name, child in module.named_children():
            visit(child, f"{path}.{name}" if path else name)
        order.setdefault(path, (enter, next(counter)))

    visit(model, "")
    missing = [s.path for s in sites if s.path not in order]
    if missing:
        raise ModelError(f"{type(model).__name__} has no module {missing[0]!r}")
    return sorted(sites, key=lambda s: order[s.path][0 if s.port == "input" else 1])


def _input_device(model: torch.nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
