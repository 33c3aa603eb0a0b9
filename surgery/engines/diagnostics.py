"""Diagnostics of attribution and prune runs (DESIGN §2.4, seed 004): statistics, plots, commands.

- :func:`sign_stats`: mean, median, standard deviation, range and the shares of positive and
  negative scores (sign convention: negative = the unit lowers the loss).
- :func:`sample_similarity`: pairwise Pearson and cosine matrices of per-sample attribution
  vectors, and the per-unit variance across samples.
- :func:`compare_scores`: Pearson and cosine of two runs' scores, and the mean per-sample Pearson
  when both kept per-sample vectors for the same samples.
- ``surgery report RUN_DIR`` and ``surgery compare RUN_A RUN_B`` print these for the attribution
  (and prune) steps of run directories; ``--json`` prints them as JSON.
- :func:`save_heatmap` (layer x unit) and :func:`save_curve` (objective vs fraction pruned) write
  PNG files with matplotlib's Agg backend.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from surgery.core.artifacts import META_FILE, Artifact
from surgery.core.errors import SurgeryError
from surgery.core.io import atomic_path, read_json

VARIANCE_THRESHOLDS = (0.001, 0.005)  # the cut-offs seed 004 reports head counts for


# --- statistics -------------------------------------------------------------------------------

def sign_stats(values: torch.Tensor) -> dict[str, float]:
    """Sign statistics of a flat score vector."""
    v = values.double().flatten()
    if v.numel() == 0:
        return {"count": 0}
    return {
        "count": int(v.numel()), "mean": float(v.mean()), "median": float(v.median()),
        "std": float(v.std()) if v.numel() > 1 else 0.0, "min": float(v.min()), "max": float(v.max()),
        "share_positive": float((v > 0).double().mean()), "share_negative": float((v < 0).double().mean()),
    }


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    denom = a.norm() * b.norm()
    return float(a @ b / denom) if denom > 0 else float("nan")


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    denom = a.norm() * b.norm()
    return float(a @ b / denom) if denom > 0 else float("nan")


def pearson_matrix(x_nd: torch.Tensor) -> torch.Tensor:
    """Pairwise Pearson correlation of the rows of ``x_nd`` ``[n, n]``."""
    centred = x_nd.double() - x_nd.double().mean(1, keepdim=True)
    return cosine_matrix(centred)


def cosine_matrix(x_nd: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarity of the rows of ``x_nd`` ``[n, n]``."""
    x = x_nd.double()
    unit = x / x.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return unit @ unit.T


def _off_diagonal(m_nn: torch.Tensor) -> torch.Tensor:
    n = m_nn.shape[0]
    return m_nn[~torch.eye(n, dtype=torch.bool)]


def sample_similarity(per_sample_nd: torch.Tensor) -> dict[str, Any]:
    """Pearson/cosine matrices of per-sample vectors ``[n, d]`` and the per-unit cross-sample variance."""
    n = per_sample_nd.shape[0]
    out: dict[str, Any] = {"samples": n}
    if n >= 2:
        p, c = pearson_matrix(per_sample_nd), cosine_matrix(per_sample_nd)
        off_p, off_c = _off_diagonal(p), _off_diagonal(c)
        out.update({
            "pearson_mean": float(off_p.mean()), "pearson_min": float(off_p.min()), "pearson_max": float(off_p.max()),
            "cosine_mean": float(off_c.mean()), "pearson_matrix": p.tolist(), "cosine_matrix": c.tolist(),
        })
        var_d = per_sample_nd.double().var(0)
        out["variance"] = {
            "mean": float(var_d.mean()), "median": float(var_d.median()), "max": float(var_d.max()),
            **{f"above_{t:g}": int((var_d > t).sum()) for t in VARIANCE_THRESHOLDS},
            "top_units": var_d.argsort(descending=True)[:5].tolist(),
        }
    return out


def compare_scores(a: torch.Tensor, b: torch.Tensor, per_sample_a: torch.Tensor | None = None,
                   per_sample_b: torch.Tensor | None = None) -> dict[str, Any]:
    """Pearson and cosine of two flat score vectors (and of matching per-sample vectors)."""
    if a.shape != b.shape:
        raise SurgeryError(f"cannot compare scores of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    out: dict[str, Any] = {"pearson": pearson(a, b), "cosine": cosine(a, b), "a": sign_stats(a), "b": sign_stats(b)}
    if per_sample_a is not None and per_sample_b is not None and per_sample_a.shape == per_sample_b.shape:
        rows = [pearson(x, y) for x, y in zip(per_sample_a, per_sample_b)]
        out["per_sample_pearson_mean"] = sum(rows) / len(rows)
        out["per_sample_pearson"] = rows
    return out


# --- run directories --------------------------------------------------------------------------

@dataclass
class AttributionStep:
    """An attribution step's directory, its artifact and its real (unpadded) scores."""

    directory: Path
    artifact: Artifact

    @property
    def units(self) -> list[int]:
        scores = self.artifact.tensors["scores"]
        return self.artifact.meta.get("units_per_layer") or [scores.shape[1]] * scores.shape[0]

    def flat(self, scores_lu: torch.Tensor) -> torch.Tensor:
        """The real entries of ``[..., layers, units]`` flattened over the last two axes."""
        return torch.cat([scores_lu[..., l, :u] for l, u in enumerate(self.units)], dim=-1)

    @property
    def scores(self) -> torch.Tensor:
        return self.flat(self.artifact.tensors["scores"])

    @property
    def per_sample(self) -> torch.Tensor | None:
        ps = self.artifact.tensors.get("per_sample")
        return None if ps is None else self.flat(ps)


def step_dirs(run_dir: Path) -> list[Path]:
    """Step directories of a run directory (or ``run_dir`` itself when it is a step directory)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SurgeryError(f"{run_dir}: not a directory")
    if (run_dir / META_FILE).is_file():
        return [run_dir]
    return sorted(p for p in run_dir.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / META_FILE).is_file())


def step_names(run_dir: Path) -> dict[str, str]:
    """Step directory name -> the step's recipe name, from the run's report.json (if any)."""
    report_file = Path(run_dir) / "report.json"
    if not report_file.is_file():
        return {}
    return {s["dir"]: s["name"] for s in read_json(report_file).get("steps", []) if "dir" in s and "name" in s}


def _matches(directory: Path, step: str | None, names: dict[str, str]) -> bool:
    return step is None or step == names.get(directory.name) or step in directory.name


def attribution_steps(run_dir: Path, step: str | None = None) -> list[AttributionStep]:
    """The attribution steps (artifacts with ``scores``) of a run directory, optionally one by step
    name or by a part of its directory name."""
    found = []
    names = step_names(run_dir)
    for directory in step_dirs(run_dir):
        if not _matches(directory, step, names):
            continue
        artifact = Artifact.load(directory)
        if "scores" in artifact.tensors and "units_per_layer" in artifact.meta:
            found.append(AttributionStep(directory, artifact))
    return found


def _one_attribution(run_dir: Path, step: str | None) -> AttributionStep:
    steps = attribution_steps(run_dir, step)
    if not steps:
        raise SurgeryError(f"{run_dir}: no attribution step" + (f" matching {step!r}" if step else ""))
    return steps[-1]


def report(run_dir: Path, step: str | None = None) -> dict[str, Any]:
    """Sign statistics, completeness and per-sample similarity of every attribution step; prune results."""
    out: dict[str, Any] = {"run": str(run_dir), "attribution": [], "prune": []}
    if not step_dirs(run_dir):
        raise SurgeryError(f"{run_dir}: not a run directory (no finished step folder in it)")
    for att in attribution_steps(run_dir, step):
        meta = att.artifact.meta
        entry = {"step": att.directory.name, "method": meta.get("method"), "target": meta.get("target"),
                 "objective": meta.get("objective"), "samples": meta.get("samples"),
                 "sign_stats": sign_stats(att.scores), "completeness": meta.get("completeness")}
        if att.per_sample is not None:
            entry["per_sample"] = sample_similarity(att.per_sample)
        out["attribution"].append(entry)
    for directory in step_dirs(run_dir):
        meta = read_json(directory / META_FILE).get("meta", {})
        if "objective_before" in meta:
            keys = ("strategy", "target", "output", "fraction", "fraction_pruned", "objective_before",
                    "objective_after", "params_removed", "params_before", "curve")
            out["prune"].append({"step": directory.name, **{k: meta.get(k) for k in keys}})
    return out


def compare(run_a: Path, run_b: Path, step_a: str | None = None, step_b: str | None = None) -> dict[str, Any]:
    """Compare the (last, or named) attribution steps of two run directories."""
    a, b = _one_attribution(run_a, step_a), _one_attribution(run_b, step_b)
    out = compare_scores(a.scores, b.scores, a.per_sample, b.per_sample)
    out["a"]["step"], out["b"]["step"] = str(a.directory), str(b.directory)
    out["a"]["samples"], out["b"]["samples"] = a.artifact.meta.get("samples"), b.artifact.meta.get("samples")
    return out


# --- text output ------------------------------------------------------------------------------

STAT_KEYS = ("count", "mean", "median", "std", "min", "max", "share_positive", "share_negative")


def format_report(rep: dict[str, Any]) -> str:
    lines = [f"run {rep['run']}"]
    for entry in rep["attribution"]:
        lines.append(f"\n{entry['step']}: {entry['method']} over {entry['target']}, objective {entry['objective']}, "
                     f"{entry['samples']} samples")
        lines += [f"  {k:<16} {_fmt(entry['sign_stats'].get(k))}" for k in STAT_KEYS]
        check = entry.get("completeness")
        if check:
            lines.append(f"  completeness     {check['mode']}: max relative error {check['max_relative_error']:.3g}, "
                         f"max absolute error {check['max_abs_error']:.3g}")
        sim = entry.get("per_sample")
        if sim and sim["samples"] >= 2:
            lines.append(f"  per-sample       Pearson mean {sim['pearson_mean']:.4f} (range {sim['pearson_min']:.4f}"
                         f"..{sim['pearson_max']:.4f}), cosine mean {sim['cosine_mean']:.4f}")
            var = sim["variance"]
            above = ", ".join(f"{k.replace('above_', '> ')}: {v}" for k, v in var.items() if k.startswith("above_"))
            lines.append(f"  cross-sample var mean {var['mean']:.3g}, median {var['median']:.3g}, max {var['max']:.3g}; "
                         f"units {above}")
            if sim["samples"] <= 12:
                lines.append("  Pearson matrix")
                lines += ["    " + " ".join(f"{x:6.3f}" for x in row) for row in sim["pearson_matrix"]]
    for entry in rep["prune"]:
        requested = f" (requested {_fmt(entry['fraction'])})" if entry.get("fraction") is not None else ""
        lines.append(f"\n{entry['step']}: {entry['strategy']} prune of {entry['target']} ({entry['output']}), "
                     f"{_fmt(entry.get('fraction_pruned'))} pruned{requested}")
        lines.append(f"  objective {_fmt(entry['objective_before'])} -> {_fmt(entry['objective_after'])}, "
                     f"parameters removed {entry['params_removed']} of {entry['params_before']}")
    if not rep["attribution"] and not rep["prune"]:
        lines.append("(no attribution or prune steps)")
    return "\n".join(lines)


def format_compare(cmp: dict[str, Any]) -> str:
    lines = [f"A: {cmp['a']['step']} ({cmp['a']['samples']} samples)",
             f"B: {cmp['b']['step']} ({cmp['b']['samples']} samples)",
             f"{'':<16} {'A':>12} {'B':>12} {'B - A':>12}"]
    for key in STAT_KEYS:
        a, b = cmp["a"].get(key), cmp["b"].get(key)
        lines.append(f"{key:<16} {_fmt(a):>12} {_fmt(b):>12} {_fmt(b - a):>12}")
    lines.append(f"Pearson {cmp['pearson']:.4f}   cosine {cmp['cosine']:.4f}")
    if "per_sample_pearson_mean" in cmp:
        lines.append(f"per-sample Pearson (A_i vs B_i) mean {cmp['per_sample_pearson_mean']:.4f}")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def register_commands(cli: Any) -> None:
    """Add ``surgery report`` and ``surgery compare`` to the command group ``cli``."""
    import click

    if "report" in getattr(cli, "commands", {}):
        return

    @cli.command("report")
    @click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
    @click.option("--step", default=None, help="Only the step of this name (or whose directory name contains this).")
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    def report_command(run_dir: str, step: str | None, as_json: bool) -> None:
        """Sign statistics, completeness, per-sample similarity and prune results of RUN_DIR."""
        rep = report(Path(run_dir), step)
        click.echo(json.dumps(rep, indent=2) if as_json else format_report(rep))

    @cli.command("compare")
    @click.argument("run_a", type=click.Path(exists=True, file_okay=False))
    @click.argument("run_b", type=click.Path(exists=True, file_okay=False))
    @click.option("--step-a", default=None, help="Attribution step of RUN_A by name or directory (default: the last).")
    @click.option("--step-b", default=None, help="Attribution step of RUN_B by name or directory (default: the last).")
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    def compare_command(run_a: str, run_b: str, step_a: str | None, step_b: str | None, as_json: bool) -> None:
        """Pearson, cosine and statistics side by side of two attribution runs."""
        cmp = compare(Path(run_a), Path(run_b), step_a, step_b)
        click.echo(json.dumps(cmp, indent=2) if as_json else format_compare(cmp))


# --- plots ------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_heatmap(scores_lu: torch.Tensor, path: Path, title: str) -> None:
    """A layer x unit heatmap, diverging around 0 (blue = lowers the loss, red = raises it)."""
    plt = _pyplot()
    values = scores_lu.detach().double().cpu().numpy()
    limit = float(abs(values).max()) or 1.0
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * values.shape[1] + 2), max(3.0, 0.25 * values.shape[0] + 1.5)))
    image = ax.imshow(values, cmap="coolwarm", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("unit")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="attribution")
    _save(fig, path)


def save_curve(curves: dict[str, list[tuple[float, float]]], path: Path, title: str, ylabel: str = "objective") -> None:
    """Objective vs fraction pruned, one line per named curve."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, points in curves.items():
        xs, ys = zip(*points) if points else ((), ())
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel("fraction pruned")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    _save(fig, path)


def _save(fig: Any, path: Path) -> None:
    plt = _pyplot()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
