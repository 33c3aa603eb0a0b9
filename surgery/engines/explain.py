"""Feature explanations: top-activating token windows in seed 002's prompt layout, and scoring.

Export. For each SAE feature, the ``top`` records (token windows around the token where the
feature peaks, one per sequence at most) are kept while the probe data streams past. Activations
are written as ``token<TAB>activation`` with the activation scaled to an integer 0..10::

    scaled = min(10, floor(10 * relu(a) / max))

where ``max`` is the feature's largest activation over its exported records (all zeros when the
feature never fires). The prompt lists every token, then only the non-zero ones, in the layout of
seed 002 (``Neuron N`` / ``Activations:`` / ``<start>`` ... ``<end>``), ending with the line the
explainer completes.

Scoring. A simulator predicts an activation for every token of every record from the explanation;
the score is the Pearson correlation between the true and the simulated activations pooled over
all of the feature's records (one flat list each), as in Bills et al. 2023.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from surgery.core.errors import SurgeryError

EXPLAIN_HEADER = (
    "We are studying neurons in a neural network. Each neuron looks for some particular thing in a "
    "short document. Look at the parts of the document the neuron activates for and summarize in a "
    "single sentence what the neuron is looking for. Don't list examples of words.\n\n"
    "The activation format is token<tab>activation. Activation values range from 0 to 10. A neuron "
    "finding what it's looking for is represented by a non-zero activation value. The higher the "
    "activation value, the stronger the match."
)
SIMULATE_HEADER = (
    "We are studying neurons in a neural network. Each neuron looks for some particular thing in a "
    "short document. Look at an explanation of what the neuron does, and try to predict its "
    "activations on each token.\n\n"
    "The activation format is token<tab>activation, activations go from 0 to 10, \"unknown\" "
    "indicates an unknown activation. Most activations will be 0."
)


class ExplainError(SurgeryError):
    """Explanation files that are malformed or do not match each other."""


@dataclass
class Record:
    """One token window: the tokens and the feature's raw activation on each."""

    tokens: list[str]
    activations: list[float]

    def peak(self) -> float:
        return max(self.activations) if self.activations else 0.0


@dataclass
class FeatureRecords:
    feature: int
    records: list[Record] = field(default_factory=list)

    @property
    def max_activation(self) -> float:
        return max((r.peak() for r in self.records), default=0.0)


# --- scaling and layout ------------------------------------------------------------------------

def scale(activations: Iterable[float], max_activation: float) -> list[int]:
    """``min(10, floor(10 * relu(a) / max))`` per activation; all 0 when ``max <= 0``."""
    if not max_activation > 0:
        return [0 for _ in activations]
    return [min(10, math.floor(10 * max(a, 0.0) / max_activation)) for a in activations]


def clean_token(token: str) -> str:
    """A token as one printable field: tabs and newlines shown as escapes."""
    return token.replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def activation_block(tokens: list[str], values: list[Any]) -> str:
    lines = ["<start>"] + [f"{clean_token(t)}\t{v}" for t, v in zip(tokens, values)] + ["<end>"]
    return "\n".join(lines)


def feature_section(feature: FeatureRecords, label: str | None = None) -> str:
    """One neuron's records: all tokens, then the non-zero ones (seed 002's layout)."""
    label = label or str(feature.feature)
    top = feature.max_activation
    parts = [f"Neuron {label}"]
    for record in feature.records:
        scaled = scale(record.activations, top)
        nonzero = [(t, v) for t, v in zip(record.tokens, scaled) if v > 0]
        parts.append("Activations:\n" + activation_block(record.tokens, scaled))
        parts.append("Activations (non-zero only):\n" + activation_block([t for t, _ in nonzero], [v for _, v in nonzero]))
    return "\n\n".join(parts)


def explain_prompt(feature: FeatureRecords) -> str:
    """The full explainer prompt for ``feature``, ending where the explanation is written."""
    return (f"{EXPLAIN_HEADER}\n\n---\n\n{feature_section(feature)}\n\n"
            f"Explanation of neuron {feature.feature} behavior: the main thing this neuron does is find")


def simulate_prompt(feature: FeatureRecords, explanation: str) -> str:
    """The simulator prompt: the explanation, then every record with ``unknown`` activations."""
    blocks = [activation_block(r.tokens, ["unknown"] * len(r.tokens)) for r in feature.records]
    return (f"{SIMULATE_HEADER}\n\n---\n\nNeuron {feature.feature}\n"
            f"Explanation of neuron {feature.feature} behavior: {explanation}\nActivations:\n" + "\n".join(blocks))


# --- collecting top-activating windows ----------------------------------------------------------

class TopWindows:
    """Streams batches of SAE features and keeps, per feature, the ``top`` highest-peaking windows."""

    def __init__(self, features: list[int], top: int, window: int) -> None:
        self.features = list(features)
        self.top = top
        self.window = window
        self._heaps: dict[int, list[tuple[float, int, Record]]] = {f: [] for f in self.features}
        self._seen = 0

    def add(self, features_btf: torch.Tensor, tokens_bt: list[list[str]], mask_bt: torch.Tensor) -> None:
        """``features_btf`` holds the selected features only, in ``self.features`` order."""
        acts = features_btf.detach().float().cpu()
        for row, tokens in enumerate(tokens_bt):
            length = int(mask_bt[row].sum())
            self._seen += 1
            if length == 0:
                continue
            row_tf = acts[row, :length]
            peaks_f, where_f = row_tf.max(0)
            for column, feature in enumerate(self.features):
                peak = float(peaks_f[column])
                if peak <= 0:
                    continue
                start, end = self._span(int(where_f[column]), length)
                record = Record(tokens[start:end], [float(a) for a in row_tf[start:end, column]])
                self._push(feature, (peak, -self._seen, record))

    def _span(self, peak_at: int, length: int) -> tuple[int, int]:
        start = max(0, min(peak_at - (self.window * 3) // 4, length - self.window))
        return start, min(length, start + self.window)

    def _push(self, feature: int, item: tuple[float, int, Record]) -> None:
        heap = self._heaps[feature]
        if len(heap) < self.top:
            heapq.heappush(heap, item)
        elif item[:2] > heap[0][:2]:
            heapq.heapreplace(heap, item)

    def result(self) -> list[FeatureRecords]:
        out = []
        for feature in self.features:
            ranked = sorted(self._heaps[feature], key=lambda item: item[:2], reverse=True)
            out.append(FeatureRecords(feature, [record for _, _, record in ranked]))
        return out


# --- export files ------------------------------------------------------------------------------

def export_json(features: list[FeatureRecords]) -> dict[str, Any]:
    """Everything the prompts show, plus the raw activations the scorer compares with."""
    return {"features": [
        {"feature": f.feature, "max_activation": f.max_activation,
         "records": [{"tokens": r.tokens, "activations": r.activations, "scaled": scale(r.activations, f.max_activation)}
                     for r in f.records]}
        for f in features
    ]}


def features_from_json(data: Any, where: str) -> list[FeatureRecords]:
    try:
        return [FeatureRecords(int(f["feature"]), [Record(list(r["tokens"]), [float(a) for a in r["activations"]])
                                                  for r in f["records"]])
                for f in data["features"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise ExplainError(f"not an explanation export ({type(exc).__name__}: {exc})", where=where) from None


# --- scoring -----------------------------------------------------------------------------------

def parse_simulation(text: str, where: str) -> dict[int, list[list[float]]]:
    """Simulated activations: ``Neuron N`` lines, then ``<start>``/``<end>`` records of
    ``token<TAB>value`` lines (the simulator prompt's layout with numbers for ``unknown``)."""
    out: dict[int, list[list[float]]] = {}
    current: int | None = None
    record: list[float] | None = None
    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("Neuron "):
            try:
                current = int(stripped.split()[1])
            except (IndexError, ValueError):
                raise ExplainError(f"line {lineno}: expected 'Neuron <number>'", where=where) from None
            out.setdefault(current, [])
        elif stripped == "<start>":
            if current is None:
                raise ExplainError(f"line {lineno}: a record before any 'Neuron N' line", where=where)
            record = []
        elif stripped == "<end>":
            if record is None:
                raise ExplainError(f"line {lineno}: '<end>' without '<start>'", where=where)
            out[current].append(record)
            record = None
        elif record is not None and stripped:
            try:
                record.append(float(line.rsplit("\t", 1)[1]))
            except (IndexError, ValueError):
                raise ExplainError(f"line {lineno}: expected token<TAB>number, got {line!r}", where=where) from None
    if record is not None:
        raise ExplainError("the last record has no '<end>'", where=where)
    return out


def pearson(x: list[float], y: list[float]) -> float:
    """Pearson correlation of two equally long lists (nan when either is constant)."""
    a = torch.tensor(x, dtype=torch.float64)
    b = torch.tensor(y, dtype=torch.float64)
    a, b = a - a.mean(), b - b.mean()
    denominator = float(a.norm() * b.norm())
    return float((a * b).sum()) / denominator if denominator > 0 else float("nan")


def score_feature(feature: FeatureRecords, simulated: list[list[float]], where: str = "") -> float:
    """Pearson correlation of true vs simulated activations pooled over all of the feature's records."""
    if len(simulated) != len(feature.records):
        raise ExplainError(f"neuron {feature.feature}: {len(simulated)} simulated records, the export has {len(feature.records)}", where=where or None)
    true, predicted = [], []
    for i, (record, values) in enumerate(zip(feature.records, simulated)):
        if len(values) != len(record.activations):
            raise ExplainError(f"neuron {feature.feature}, record {i}: {len(values)} simulated tokens, the export has {len(record.activations)}", where=where or None)
        true.extend(record.activations)
        predicted.extend(values)
    return pearson(true, predicted)
