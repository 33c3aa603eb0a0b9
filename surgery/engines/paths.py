"""Path sampling and length-agnostic neuron encodings (LAPE, DESIGN §2.3, seed 001).

For each probe prompt x, N_s continuations S_k are sampled with top-p sampling, path k having a
length drawn from U{len_min, ..., len_max}; one teacher-forced nnsight pass per batch of paths reads
each layer's neuron activations and MLP output averaged over the path, and the path's log
probability. Paths are weighted ``omega_k = softmax_k(log p(S_k|x) + (len_k - 1) log gamma)``
(self-normalised: the seed's product underflows to 0), and
``phi_{l,i}(x) = sum_k omega_k [a_{l,i}(S_k), g_{l,i}(S_k), L_norm(S_k)]``. The ``lape`` capture
plugin and the ``lape-tefm`` merge both encode models with :func:`encode_model`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

from surgery.core import guards
from surgery.core.errors import ModelError
from surgery.models.adapters import LayerView, ModelView, envoy_at, write_directions


def path_log_weights(logp_k: torch.Tensor, lengths_k: torch.Tensor, gamma: float) -> torch.Tensor:
    """``log p(S_k|x) + (len_k - 1) log gamma``: the log of the seed's unnormalised weight."""
    return logp_k.double() + (lengths_k.double() - 1) * math.log(gamma)



def path_weights(logp_k: torch.Tensor, lengths_k: torch.Tensor, gamma: float) -> torch.Tensor:
    """``omega_k`` = softmax over the last axis (the paths of one input) of the log weights."""
    return torch.softmax(path_log_weights(logp_k, lengths_k, gamma), dim=-1)



def effective_sample_size(omega_k: torch.Tensor) -> torch.Tensor:
    """``1 / sum_k omega_k^2``: 1 when one path holds all the weight, N_s when weights are equal."""
    return 1.0 / omega_k.double().square().sum(-1)



def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix-style constants; stable across runs and machines)."""
    out = 0x94D049BB133111EB
    for value in values:
        out = (out * 0x9E3779B97F4A7C15 + int(value) * 0xBF58476D1CE4E5B9 + 0x2545F4914F6CDD1D) % (2**63 - 1)
    return out



def path_draws(seed: int, input_index: int, paths: int, len_min: int, len_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lengths [N_s], uniforms [N_s, len_max]) for one input; path k's come from seed (seed, x, k)."""
    lengths, uniforms = [], []
    for k in range(paths):
        generator = torch.Generator().manual_seed(_mix(seed, input_index, k))
        lengths.append(int(torch.randint(len_min, len_max + 1, (1,), generator=generator)))
        uniforms.append(torch.rand(len_max, generator=generator, dtype=torch.float64))
    return torch.tensor(lengths), torch.stack(uniforms)



def top_p_pick(logits_rv: torch.Tensor, uniform_r: torch.Tensor, top_p: float, temperature: float = 1.0) -> torch.Tensor:
    """Top-p sampling by inverse CDF: one uniform per row picks a token of the row's nucleus.

    The nucleus is the smallest set of most probable tokens whose mass reaches ``top_p`` (the most
    probable token always belongs to it); token ids ``[R]``.
    """
    probs_rv = torch.softmax(logits_rv.double() / temperature, dim=-1)
    sorted_rv, order_rv = probs_rv.sort(dim=-1, descending=True)
    before_rv = sorted_rv.cumsum(-1) - sorted_rv  # mass of the strictly more probable tokens
    kept_rv = torch.where(before_rv < top_p, sorted_rv, torch.zeros_like(sorted_rv))
    cdf_rv = kept_rv.cumsum(-1)
    target_r1 = uniform_r.to(cdf_rv).unsqueeze(-1) * cdf_rv[:, -1:]
    rank_r = torch.searchsorted(cdf_rv, target_r1, right=True).clamp_max(cdf_rv.shape[-1] - 1)
    rank_r = torch.minimum(rank_r, (kept_rv > 0).sum(-1, keepdim=True) - 1)
    return order_rv.gather(-1, rank_r).squeeze(-1)



@dataclass
class PathBatch:
    """Sampled paths of several inputs: row r = input r // N_s, path r % N_s."""

    ids_rt: torch.Tensor       # [R, P + Lmax] left-padded prompt, then the path's tokens
    mask_rt: torch.Tensor      # [R, P + Lmax] attention mask: real prompt tokens and path tokens < len
    path_rt: torch.Tensor      # [R, P + Lmax] float, 1 on the path's own tokens
    lengths_r: torch.Tensor    # [R]
    prompt_width: int          # P

    @property
    def positions_rt(self) -> torch.Tensor:
        return (self.mask_rt.cumsum(1) - 1).clamp_min(0)



def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B, P], mask [B, P])`` with every prompt right-aligned."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids, mask



@torch.no_grad()
def sample_paths(model: torch.nn.Module, prompts: Sequence[Sequence[int]], lengths_r: torch.Tensor,
                 uniforms_rl: torch.Tensor, *, top_p: float, temperature: float = 1.0, pad_id: int = 0) -> PathBatch:
    """Generate every row's path at once with the KV cache (row r continues ``prompts[r // N_s]``).

    ``lengths_r`` [R] and ``uniforms_rl`` [R, >= max length] come from :func:`path_draws`; rows stop
    counting at their own length (later tokens are generated but masked out).
    """
    paths = len(lengths_r) // len(prompts)
    device = _input_device(model)
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    ids_rp = prompt_ids.repeat_interleave(paths, 0).to(device)
    mask_rp = prompt_mask.repeat_interleave(paths, 0).to(device)
    steps = int(lengths_r.max())
    position_r1 = (mask_rp.sum(1, keepdim=True) - 1)
    out = model(input_ids=ids_rp, attention_mask=mask_rp, position_ids=(mask_rp.cumsum(1) - 1).clamp_min(0), use_cache=True)
    mask, tokens = mask_rp, []
    for step in range(steps):
        token_r = top_p_pick(out.logits[:, -1].float(), uniforms_rl[:, step].to(device), top_p, temperature)
        tokens.append(token_r)
        if step == steps - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        position_r1 = position_r1 + 1
        out = model(input_ids=token_r[:, None], attention_mask=mask, position_ids=position_r1,
                    past_key_values=out.past_key_values, use_cache=True)
    path_ids = torch.stack(tokens, dim=1)
    inside = (torch.arange(steps, device=device)[None, :] < lengths_r.to(device)[:, None]).long()
    return PathBatch(
        ids_rt=torch.cat([ids_rp, path_ids], dim=1),
        mask_rt=torch.cat([mask_rp, inside], dim=1),
        path_rt=torch.cat([torch.zeros_like(mask_rp), inside], dim=1).float(),
        lengths_r=lengths_r.to(device),
        prompt_width=ids_rp.shape[1],
    )



def path_mean(value_rtf: torch.Tensor, path_rt: torch.Tensor) -> torch.Tensor:
    """Mean of ``value`` over each row's path tokens: [R, F] (float32)."""
    weights_rt = path_rt.to(value_rtf.device, torch.float32)
    summed = torch.einsum("rt,rtf->rf", weights_rt, value_rtf.float())
    return summed / weights_rt.sum(1, keepdim=True).clamp_min(1)



def path_log_prob(logits_rtv: torch.Tensor, batch: PathBatch) -> torch.Tensor:
    """``log p(S|x)`` per row: sum over path tokens of ``z[s_t] - logsumexp(z)`` at the position before."""
    start = batch.prompt_width
    z_rtv = logits_rtv[:, start - 1:-1].float()
    target_rt = batch.ids_rt[:, start:].to(z_rtv.device)
    token_rt = z_rtv.gather(-1, target_rt.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z_rtv, dim=-1)
    return (token_rt * batch.path_rt[:, start:].to(z_rtv.device)).double().sum(1)



class PathReader:
    """One nnsight trace per path batch: per row, path-mean neuron activations and MLP outputs."""

    def __init__(self, model: torch.nn.Module, layers: Sequence[LayerView]) -> None:
        import warnings

        from nnsight import NNsight

        self.model = model
        self.layers = list(layers)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.traced = NNsight(model)
        self.envoys = [envoy_at(self.traced, layer.mlp.down) for layer in self.layers]

    @torch.no_grad()
    def read(self, batch: PathBatch, activations: bool = True) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """``(log p [R], acts per layer [R, I] (empty if not asked), outputs per layer [R, D])``."""
        import nnsight

        path_rt = batch.path_rt
        with self.traced.trace(input_ids=batch.ids_rt, attention_mask=batch.mask_rt, position_ids=batch.positions_rt):
            acts, outs = nnsight.save([]), nnsight.save([])
            for envoy in self.envoys:  # execution order: layer by layer, input before output
                if activations:
                    raw = envoy.input
                    acts.append(path_mean(raw[0] if isinstance(raw, tuple) else raw, path_rt))
                raw = envoy.output
                outs.append(path_mean(raw[0] if isinstance(raw, tuple) else raw, path_rt))
            logp = nnsight.save(path_log_prob(self.traced.output.logits, batch))
        return logp, list(acts), list(outs)



def unit_write_directions(model: torch.nn.Module, layer: LayerView) -> torch.Tensor:
    """``d_i / |d_i|`` as columns: [D, I] float32."""
    directions_di = write_directions(model, layer.mlp).detach().float()
    return directions_di / directions_di.norm(dim=0, keepdim=True).clamp_min(1e-12)



def lape_phi(acts_xni: torch.Tensor, outs_xnd: torch.Tensor, units_di: torch.Tensor, omega_xn: torch.Tensor,
             nll_xn: torch.Tensor, ref_xnd: torch.Tensor | None = None) -> torch.Tensor:
    """``phi(x) = sum_k omega_k [a, g, L_norm]`` per neuron: [X, I, 3] (float64).

    ``g = a <Y - Y_ref, d/|d|>``; ``Y_ref`` = ``ref_xnd`` (the parent's output on the same path) or
    the omega-weighted mean output over the input's paths.
    """
    omega = omega_xn.double()
    acts, outs = acts_xni.double(), outs_xnd.double()
    if ref_xnd is None:
        ref = torch.einsum("xn,xnd->xd", omega, outs)[:, None, :]
    else:
        ref = ref_xnd.double()
    proj_xni = (outs - ref) @ units_di.double().to(outs.device)
    a = torch.einsum("xn,xni->xi", omega, acts)
    g = torch.einsum("xn,xni->xi", omega, acts * proj_xni)
    loss = (omega * nll_xn.double()).sum(-1)[:, None].expand_as(a)
    return torch.stack([a, g, loss], dim=-1)



def plain_mean(acts_xni: torch.Tensor, lengths_xn: torch.Tensor) -> torch.Tensor:
    """The plain token mean of a over all sampled path tokens of each input: [X, I]."""
    tokens = lengths_xn.double()
    return torch.einsum("xn,xni->xi", tokens, acts_xni.double()) / tokens.sum(-1, keepdim=True)



@dataclass(frozen=True)
class PathSettings:
    paths: int = 50
    len_min: int = 8
    len_max: int = 32
    top_p: float = 0.9
    temperature: float = 1.0
    gamma: float = 0.99

    @classmethod
    def of(cls, options: Any) -> "PathSettings":
        return cls(**{name: getattr(options, name) for name in cls.__dataclass_fields__})



class LapeEncoder:
    """Streams LAPE encodings of one model over batches of prompts (token id lists)."""

    def __init__(self, model: torch.nn.Module, view: ModelView, settings: PathSettings, *, seed: int = 0,
                 layers: Sequence[int] | None = None, parent: torch.nn.Module | None = None,
                 parent_view: ModelView | None = None, pad_id: int = 0) -> None:
        if not view.causal:
            raise ModelError(f"LAPE samples continuations, so it needs a causal LM (got a {view.model_type} model that is not causal)")
        chosen = [view.layers[i] for i in layers] if layers is not None else list(view.layers)
        self.model, self.settings, self.seed, self.pad_id = model, settings, seed, pad_id
        self.layer_ids = [layer.index for layer in chosen]
        self.reader = PathReader(model, chosen)
        self.units = [unit_write_directions(model, layer) for layer in chosen]
        self.parent = None
        if parent is not None:
            parent_layers = [parent_view.layers[i] for i in self.layer_ids]
            self.parent = PathReader(parent, parent_layers)
        self.phi: list[list[torch.Tensor]] = [[] for _ in chosen]
        self.plain: list[list[torch.Tensor]] = [[] for _ in chosen]
        self.paths: dict[str, list[torch.Tensor]] = {"logp": [], "lengths": [], "nll": [], "omega": []}
        self.inputs_seen = 0

    def add(self, prompts: Sequence[Sequence[int]]) -> None:
        """Sample, read and encode the paths of ``prompts`` (the next inputs of the probe set)."""
        s = self.settings
        draws = [path_draws(self.seed, self.inputs_seen + i, s.paths, s.len_min, s.len_max) for i in range(len(prompts))]
        lengths_r = torch.cat([d[0] for d in draws])
        uniforms_rl = torch.cat([d[1] for d in draws])
        batch = sample_paths(self.model, prompts, lengths_r, uniforms_rl, top_p=s.top_p, temperature=s.temperature, pad_id=self.pad_id)
        logp_r, acts, outs = self.reader.read(batch)
        refs = self.parent.read(_on_device(batch, _input_device(self.parent.model)), activations=False)[2] if self.parent else None
        shape = (len(prompts), s.paths)
        lengths_xn = lengths_r.view(shape).double()
        logp_xn = logp_r.cpu().view(shape)
        nll_xn = -logp_xn / lengths_xn
        omega_xn = path_weights(logp_xn, lengths_xn, s.gamma)
        for index, (act_ri, out_rd) in enumerate(zip(acts, outs)):
            act_xni, out_xnd = act_ri.cpu().view(*shape, -1), out_rd.cpu().view(*shape, -1)
            ref_xnd = refs[index].cpu().view(*shape, -1) if refs is not None else None
            self.phi[index].append(lape_phi(act_xni, out_xnd, self.units[index].cpu(), omega_xn, nll_xn, ref_xnd))
            self.plain[index].append(plain_mean(act_xni, lengths_xn))
        for key, value in (("logp", logp_xn), ("lengths", lengths_xn), ("nll", nll_xn), ("omega", omega_xn)):
            self.paths[key].append(value)
        self.inputs_seen += len(prompts)

    def result(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Artifact tensors (``prefix`` + ``<layer>/phi_x`` ...); raises NumericError on NaN/Inf."""
        tensors: dict[str, torch.Tensor] = {}
        for layer, phi, plain in zip(self.layer_ids, self.phi, self.plain):
            phi_xi3 = torch.cat(phi)
            tensors[f"{prefix}{layer}/phi_x"] = phi_xi3.float()
            tensors[f"{prefix}{layer}/phi"] = phi_xi3.mean(0).float()
            tensors[f"{prefix}{layer}/plain_x"] = torch.cat(plain).float()
        for key, values in self.paths.items():
            tensors[f"{prefix}paths/{key}"] = torch.cat(values).float()
        guards.check_tensors("lape tensor", tensors)
        return tensors



def prompt_ids(tokenizer: Any, examples: Iterable[dict], max_tokens: int | None = None) -> list[list[int]]:
    """Token ids of each example's prompt (its text when it has none), without a closing EOS:
    a continuation starts after the prompt, not after an end of text."""
    if tokenizer is None:
        raise ModelError("lape needs a model with a tokenizer to sample continuations")
    eos = tokenizer.eos_token_id
    out = []
    for example in examples:
        ids = list(tokenizer(example.get("prompt", example.get("text", "")), add_special_tokens=True)["input_ids"])
        while len(ids) > 1 and eos is not None and ids[-1] == eos:
            ids.pop()
        out.append(ids[:max_tokens] if max_tokens else ids)
    return out



def encode_model(model: torch.nn.Module, view: ModelView, prompts: Sequence[Sequence[int]], settings: PathSettings, *,
                 batch_size: int = 8, seed: int = 0, layers: Sequence[int] | None = None,
                 parent: torch.nn.Module | None = None, parent_view: ModelView | None = None, pad_id: int = 0,
                 progress=lambda it, **_: it) -> dict[str, torch.Tensor]:
    """LAPE tensors of ``model`` over ``prompts`` (see the module docstring for the keys)."""
    encoder = LapeEncoder(model, view, settings, seed=seed, layers=layers, parent=parent, parent_view=parent_view, pad_id=pad_id)
    starts = range(0, len(prompts), batch_size)
    for start in progress(starts, total=len(starts)):
        encoder.add(prompts[start:start + batch_size])
    return encoder.result()



def _input_device(model: torch.nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return embeddings.weight.device if embeddings is not None else next(model.parameters()).device



def _on_device(batch: PathBatch, device: torch.device) -> PathBatch:
    return PathBatch(batch.ids_rt.to(device), batch.mask_rt.to(device), batch.path_rt.to(device),
                     batch.lengths_r.to(device), batch.prompt_width)



def probe_spec(ctx):
    """The step's data entry (``surgery.models.data.DataSpec``): its ``max_tokens`` cuts prompts, its
    ``batch_size`` is the default number of inputs generated together."""
    return ctx.data_spec()
