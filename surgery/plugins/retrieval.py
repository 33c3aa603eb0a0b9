"""The ``retrieval`` evaluate plugin: can an embedding model find a documentation paragraph from its
first sentence? A task metric for encoders (e.g. a pruned MiniLM) computed on local text.

Pairs come from the standard library's documentation topics (``pydoc_data.topics``; by default the
odd half, ``part: b``, so recipes attribute on the even half, ``stdlib-text`` with ``part: a``):
every prose paragraph of at least ``min_words`` words and two sentences, and not also in the other
half, gives a query (its first
sentence) and a document (the rest of the paragraph). Each query is embedded, and so is every
document, with the model's pooling (:func:`surgery.embeddings.pooling_mode`); the documents are
ranked by cosine similarity. Figures per model: ``recall@1``, ``recall@5`` and the mean reciprocal
rank over the ``n`` pairs (the first ``n`` in topic order; every query ranks all ``n`` documents).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from surgery import hookimpl
from surgery.core.artifacts import Artifact
from surgery.core.errors import DataError, PluginError
from surgery.core.options import Options
from surgery.engines.gates import model_inputs
from surgery.models.embeddings import HIDDEN, pool, pooling_mode
from surgery.models.stdlib_text import paragraph_pairs

class RetrievalOptions(Options):
    part: Literal["all", "a", "b"] = Field("b", description="documentation topics the pairs come from (b: the odd half)")
    n: int = Field(150, ge=2, description="query/document pairs (the first n in topic order)")
    min_words: int = Field(30, ge=4, description="shortest paragraph used")
    max_tokens: int = Field(128, ge=8, description="tokens kept of each query and document")
    batch_size: int = Field(32, ge=1, description="texts per forward pass")


def embed(module: torch.nn.Module, tokenizer, texts: list[str], mode: str, max_tokens: int, batch_size: int) -> torch.Tensor:
    """Pooled final hidden states ``[N, D]`` of ``texts``."""
    device = next(module.parameters()).device
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_tokens,
                              return_tensors="pt").to(device)
            output = module(**model_inputs(dict(batch), module))
            hidden = getattr(output, HIDDEN, None)
            if hidden is None:
                raise PluginError(f"evaluate retrieval: the model returns no {HIDDEN} (an LM-head model)")
            out.append(pool(hidden, batch["attention_mask"], mode).cpu())
    return torch.cat(out)


def rank_scores(queries_nd: torch.Tensor, documents_nd: torch.Tensor) -> dict[str, float]:
    """recall@1, recall@5 and MRR of finding document i for query i by cosine similarity."""
    sim_nn = F.normalize(queries_nd.double(), dim=-1) @ F.normalize(documents_nd.double(), dim=-1).T
    correct_n = sim_nn.diagonal()
    rank_n = (sim_nn > correct_n[:, None]).sum(1) + 1  # ties count in the model's favour
    return {"recall@1": float((rank_n == 1).double().mean()), "recall@5": float((rank_n <= 5).double().mean()),
            "mrr": float((1.0 / rank_n.double()).mean())}


class Retrieval:
    """Paragraph retrieval from a first sentence (stdlib documentation): recall@1/5 and MRR per model."""

    @hookimpl
    def option_schema(self, stage):
        return RetrievalOptions if stage == "evaluate" else None

    @hookimpl
    def evaluate(self, ctx):
        opts = ctx.options
        pairs = paragraph_pairs(opts.part, opts.min_words)[: opts.n]
        if len(pairs) < 2:
            raise DataError(f"{ctx.where}: only {len(pairs)} documentation pairs; lower min_words")
        figures, meta = {}, {"pairs": len(pairs), "part": opts.part, "scores": {}}
        for name in ctx.models:
            loaded = ctx.model(name)
            if loaded.tokenizer is None:
                raise DataError(f"{ctx.where}: model {name!r} has no tokenizer")
            mode = pooling_mode(loaded.path, loaded.module)
            args = (loaded.module, loaded.tokenizer)
            scores = rank_scores(embed(*args, [q for q, _ in pairs], mode, opts.max_tokens, opts.batch_size),
                                 embed(*args, [d for _, d in pairs], mode, opts.max_tokens, opts.batch_size))
            meta["scores"][name] = {**scores, "pooling": mode}
            figures.update({f"{name}/{key}": value for key, value in scores.items()})
            ctx.log(f"{name}: " + ", ".join(f"{key} {value:.3f}" for key, value in scores.items()))
        return Artifact(meta=meta, figures=figures)


retrieval = Retrieval()
