"""Diagnostics of attribution and prune runs (DESIGN §2.4, seed 004): statistics, plots, commands.

- :func:`sign_stats`: mean, median, standard deviation, range and the shares of positive and
  negative scores (sign convention: negative = the unit lowers the loss).
- :func:`sample_similarity`: pairwise Pearson and cosine matrices of per-sample attribution
  vectors, and the per-unit variance across samples.
- :func:`compare_scores`: Pearson and cosine of two runs' scores, and the mean per-sample Pearson
  when both kept per-sample vectors for the same samples.
- ``surgery report RUN_DIR`` and ``surgery compare RUN_A RUN_B`` print these for the attribution
  (and prune) steps of run directories; ``--json`` prints them as JSON; ``--plots DIR`` writes PNGs:
  layer x head heatmaps (neurons averaged into at most 64 columns) on one symmetric colour scale
  per figure, a scatter of two runs' scores with Pearson and Spearman, and the prune curves of all
  strategies on one axis (random prunes as a min..max band over seeds, each step's pruned fraction
  marked). Matplotlib's Agg backend, imported only when a plot is drawn.
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
    name: str = ""

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

    @property
    def label(self) -> str:
        """``ig per-layer`` / ``ig joint`` / ``grad-x-act``: the method and, where it has one, the mode."""
        meta = self.artifact.meta
        return " ".join(str(x) for x in (meta.get("method"), meta.get("mode")) if x)


def step_dirs(run_dir: Path) -> list[Path]:
    """Step directories of a run directory (or ``run_dir`` itself when it is a step directory)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SurgeryError(f"{run_dir}: not a directory")
    if (run_dir / META_FILE).is_file():
        return [run_dir]
    return sorted(p for p in run_dir.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / META_FILE).is_file())


def step_records(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Step directory name -> the step's entry in the run's report.json (name, stage, seconds, read ...)."""
    report_file = Path(run_dir) / "report.json"
    if not report_file.is_file():
        return {}
    return {s["dir"]: s for s in read_json(report_file).get("steps", []) if "dir" in s}


def step_names(run_dir: Path) -> dict[str, str]:
    """Step directory name -> the step's recipe name, from the run's report.json (if any)."""
    return {d: s["name"] for d, s in step_records(run_dir).items() if "name" in s}


def selected_dirs(run_dir: Path, step: str | None = None) -> list[Path]:
    """The run's step directories, or the one whose recipe name or directory name is ``step``
    (a part of a directory name matches when it matches exactly one); unknown names are an error."""
    dirs = step_dirs(run_dir)
    if step is None:
        return dirs
    names = step_names(run_dir)
    exact = [d for d in dirs if step in (names.get(d.name), d.name)]
    partial = [d for d in dirs if step in d.name]
    if exact or len(partial) == 1:
        return exact or partial
    from surgery.core.registry import did_you_mean

    known = [names.get(d.name, d.name) for d in dirs]
    if partial:
        raise SurgeryError(f"{run_dir}: --step {step!r} matches {len(partial)} steps; name one of: {', '.join(known)}")
    raise SurgeryError(f"{run_dir}: no step {step!r}" + did_you_mean(step, known))


def _is_attribution(artifact: Artifact) -> bool:
    return "scores" in artifact.tensors and "units_per_layer" in artifact.meta


def attribution_steps(run_dir: Path, step: str | None = None) -> list[AttributionStep]:
    """The attribution steps (artifacts with ``scores``) of a run directory, optionally one by step
    name or by a part of its directory name."""
    found = []
    names = step_names(run_dir)
    for directory in selected_dirs(run_dir, step):
        artifact = Artifact.load(directory)
        if _is_attribution(artifact):
            found.append(AttributionStep(directory, artifact, names.get(directory.name, directory.name)))
    return found


def _one_attribution(run_dir: Path, step: str | None) -> AttributionStep:
    steps = attribution_steps(run_dir, step)
    if not steps:
        raise SurgeryError(f"{run_dir}: no attribution step" + (f" matching {step!r}" if step else ""))
    return steps[-1]


PRUNE_KEYS = ("strategy", "target", "output", "objective", "fraction", "fraction_pruned", "objective_before",
              "objective_after", "params_removed", "params_before", "curve")


def prune_steps(run_dir: Path, step: str | None = None) -> list[dict[str, Any]]:
    """Every prune step of a run (optionally one): its meta, recipe name, time and feeding attribution."""
    records = step_records(run_dir)
    found = []
    for directory in selected_dirs(run_dir, step):
        meta = read_json(directory / META_FILE).get("meta", {})
        if "objective_before" not in meta:
            continue
        record = records.get(directory.name, {})
        found.append({"step": directory.name, "name": record.get("name", directory.name),
                      "attribution": record.get("read", {}).get("attribute"), "seconds": record.get("seconds"),
                      "run": str(run_dir), **{k: meta.get(k) for k in PRUNE_KEYS}})
    return found


def report(run_dir: Path, step: str | None = None) -> dict[str, Any]:
    """Sign statistics, completeness and per-sample similarity of every attribution step; prune
    results with their curves; the other steps' figures. ``step`` selects one step of any kind."""
    if not step_dirs(run_dir):
        raise SurgeryError(f"{run_dir}: not a run directory (no finished step folder in it)")
    out: dict[str, Any] = {"run": str(run_dir), "attribution": [], "prune": prune_steps(run_dir, step), "other": []}
    records = step_records(run_dir)
    for att in attribution_steps(run_dir, step):
        meta = att.artifact.meta
        entry = {"step": att.directory.name, "name": att.name, "method": meta.get("method"), "mode": meta.get("mode"),
                 "target": meta.get("target"), "objective": meta.get("objective"), "samples": meta.get("samples"),
                 "seconds": records.get(att.directory.name, {}).get("seconds"),
                 "sign_stats": sign_stats(att.scores), "completeness": meta.get("completeness")}
        if att.per_sample is not None:
            entry["per_sample"] = sample_similarity(att.per_sample)
        out["attribution"].append(entry)
    listed = {e["step"] for e in out["attribution"] + out["prune"]}
    for directory in selected_dirs(run_dir, step):
        if directory.name not in listed:
            record = records.get(directory.name, {})
            out["other"].append({"step": directory.name, "name": record.get("name", directory.name),
                                 "stage": record.get("stage"), "plugin": record.get("plugin"),
                                 "seconds": record.get("seconds"),
                                 "figures": read_json(directory / META_FILE).get("figures", {})})
    return out


def compare(run_a: Path, run_b: Path, step_a: str | None = None, step_b: str | None = None) -> dict[str, Any]:
    """Compare the (last, or named) attribution steps of two run directories."""
    a, b = _one_attribution(run_a, step_a), _one_attribution(run_b, step_b)
    out = compare_scores(a.scores, b.scores, a.per_sample, b.per_sample)
    out["spearman"] = spearman(a.scores, b.scores)
    out["a"]["step"], out["b"]["step"] = str(a.directory), str(b.directory)
    out["a"]["label"], out["b"]["label"] = a.label, b.label
    out["a"]["samples"], out["b"]["samples"] = a.artifact.meta.get("samples"), b.artifact.meta.get("samples")
    return out


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (average ranks for ties) of two flat score vectors."""
    from scipy.stats import spearmanr

    return float(spearmanr(a.double().numpy(), b.double().numpy()).statistic)


# --- text output ------------------------------------------------------------------------------

STAT_KEYS = ("count", "mean", "median", "std", "min", "max", "share_positive", "share_negative")
SIGN_NOTE = "sign: negative = the unit lowers the loss (useful), positive = it raises it (harmful)"


def format_report(rep: dict[str, Any]) -> str:
    lines = [f"run {rep['run']}"]
    for entry in rep["attribution"]:
        mode = f" ({entry['mode']})" if entry.get("mode") else ""
        lines.append(f"\n{_named(entry)}: {entry['method']}{mode} over {entry['target']}, "
                     f"objective {entry['objective']}, {entry['samples']} samples{_took(entry)}")
        lines.append(f"  {SIGN_NOTE}")
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
        source = f" from attribution step {entry['attribution']}" if entry.get("attribution") else ""
        lines.append(f"\n{_named(entry)}: {entry['strategy']} prune of {entry['target']}{source} "
                     f"({entry['output']}), {_fmt(entry.get('fraction_pruned'))} pruned{requested}{_took(entry)}")
        lines.append(f"  {entry.get('objective') or 'objective'} {_fmt(entry['objective_before'])} -> "
                     f"{_fmt(entry['objective_after'])}, parameters removed {entry['params_removed']} of "
                     f"{entry['params_before']}")
        if entry.get("curve"):
            lines.append("  curve (fraction pruned -> objective): "
                         + ", ".join(f"{f:.3f} -> {_fmt(y)}" for f, y in entry["curve"]))
    for entry in rep.get("other", []):
        figures = ", ".join(f"{k}={_fmt(v)}" for k, v in entry["figures"].items())
        lines.append(f"\n{_named(entry)}: {entry['stage']}: {entry['plugin']}{_took(entry)}"
                     + (f"\n  {figures}" if figures else ""))
    if not rep["attribution"] and not rep["prune"] and not rep.get("other"):
        lines.append("(no steps)")
    return "\n".join(lines)


def _named(entry: dict[str, Any]) -> str:
    """The step's recipe name, and its folder when that differs."""
    return entry["name"] if entry["name"] == entry["step"] else f"{entry['name']} [{entry['step']}]"


def _took(entry: dict[str, Any]) -> str:
    return f", {entry['seconds']:.1f} s" if isinstance(entry.get("seconds"), (int, float)) else ""


def format_compare(cmp: dict[str, Any]) -> str:
    lines = [f"A: {cmp['a']['step']} ({cmp['a'].get('label', '')}, {cmp['a']['samples']} samples)",
             f"B: {cmp['b']['step']} ({cmp['b'].get('label', '')}, {cmp['b']['samples']} samples)",
             f"{'':<16} {'A':>12} {'B':>12} {'B - A':>12}"]
    for key in STAT_KEYS:
        a, b = cmp["a"].get(key), cmp["b"].get(key)
        lines.append(f"{key:<16} {_fmt(a):>12} {_fmt(b):>12} {_fmt(b - a):>12}")
    lines.append(f"Pearson {cmp['pearson']:.4f}   Spearman {cmp.get('spearman', float('nan')):.4f}   "
                 f"cosine {cmp['cosine']:.4f}")
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
    @click.option("--step", default=None, help="Only the step of this name or directory (any kind of step).")
    @click.option("--plots", "plots_dir", default=None, type=click.Path(file_okay=False),
                  help="Write PNG plots (head heatmaps, prune curves) into this directory.")
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    def report_command(run_dir: str, step: str | None, plots_dir: str | None, as_json: bool) -> None:
        """Sign statistics, completeness, per-sample similarity, prune results and curves of RUN_DIR."""
        rep = report(Path(run_dir), step)
        written = plot_report(Path(run_dir), Path(plots_dir), step) if plots_dir else []
        click.echo(json.dumps({**rep, "plots": [str(p) for p in written]}, indent=2) if as_json else format_report(rep))
        if not as_json:
            for path in written:
                click.echo(f"wrote {path}")

    @cli.command("compare")
    @click.argument("run_a", type=click.Path(exists=True, file_okay=False))
    @click.argument("run_b", type=click.Path(exists=True, file_okay=False))
    @click.option("--step-a", default=None, help="Attribution step of RUN_A by name or directory (default: the last).")
    @click.option("--step-b", default=None, help="Attribution step of RUN_B by name or directory (default: the last).")
    @click.option("--plots", "plots_dir", default=None, type=click.Path(file_okay=False),
                  help="Write PNG plots (heatmaps on one colour scale, score scatter, prune curves) here.")
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    def compare_command(run_a: str, run_b: str, step_a: str | None, step_b: str | None, plots_dir: str | None,
                        as_json: bool) -> None:
        """Pearson, Spearman, cosine and statistics side by side of two attribution runs (and their
        prune curves on one axis with --plots)."""
        a, b = Path(run_a), Path(run_b)
        has_a, has_b = bool(attribution_steps(a, step_a)), bool(attribution_steps(b, step_b))
        cmp = compare(a, b, step_a, step_b) if (has_a and has_b) or not (prune_steps(a) and prune_steps(b)) else None
        written = plot_compare(a, b, Path(plots_dir), step_a, step_b) if plots_dir else []
        if cmp is not None:
            click.echo(json.dumps({**cmp, "plots": [str(p) for p in written]}, indent=2) if as_json else format_compare(cmp))
        elif not as_json:
            click.echo(f"{a} or {b} has no attribution step: comparing prune curves only")
        if not as_json:
            for path in written:
                click.echo(f"wrote {path}")


# --- plots ------------------------------------------------------------------------------------

MAX_COLUMNS = 64  # neuron heatmaps average this many columns at most, so 1536 neurons stay readable


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def binned(values_lu: Any, max_columns: int = MAX_COLUMNS) -> tuple[Any, int]:
    """``[layers, units]`` averaged over groups of ``width`` adjacent units (NaN padding ignored) so
    that at most ``max_columns`` columns remain; returns (binned array, width)."""
    import numpy as np

    values = np.asarray(values_lu, dtype=float)
    width = max(1, -(-values.shape[1] // max_columns))
    if width == 1:
        return values, 1
    columns = -(-values.shape[1] // width)
    padded = np.full((values.shape[0], columns * width), np.nan)
    padded[:, :values.shape[1]] = values
    with np.errstate(invalid="ignore"):
        return np.nanmean(padded.reshape(values.shape[0], columns, width), axis=2), width


def _draw_heatmap(ax: Any, scores_lu: torch.Tensor, limit: float, title: str, target: str = "heads") -> Any:
    from matplotlib.ticker import MaxNLocator

    values, width = binned(scores_lu.detach().double().cpu().numpy())
    image = ax.imshow(values, cmap="coolwarm", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    unit = "head" if target == "heads" else "neuron"
    ax.set_xlabel(unit if width == 1 else f"{unit} (mean of {width} per column; column c = {unit}s {width}c..{width}c+{width - 1})")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    return image


def _limit(*tensors: torch.Tensor) -> float:
    """The symmetric colour limit: the largest |value| of the cells drawn (after binning)."""
    import numpy as np

    cells = [binned(t.detach().double().cpu().numpy())[0] for t in tensors]
    finite = [float(np.nanmax(np.abs(c))) for c in cells if np.isfinite(c).any()]
    return max(finite) if finite and max(finite) > 0 else 1.0


def save_heatmap(scores_lu: torch.Tensor, path: Path, title: str, target: str = "heads",
                 limit: float | None = None) -> None:
    """A layer x unit heatmap on a symmetric scale (blue = lowers the loss, red = raises it)."""
    plt = _pyplot()
    columns = min(scores_lu.shape[1], MAX_COLUMNS)
    fig, ax = plt.subplots(figsize=(min(11.0, max(5.0, 0.35 * columns + 2.5)),
                                    min(8.0, max(3.0, 0.3 * scores_lu.shape[0] + 2.2))), layout="constrained")
    image = _draw_heatmap(ax, scores_lu, limit or _limit(scores_lu), f"{title}\n{SIGN_NOTE}", target)
    ax.title.set_fontsize(8)
    fig.colorbar(image, ax=ax, label="attribution (< 0: useful)")
    _save(fig, path, tight=False)


def save_heatmaps(steps: list[AttributionStep], path: Path, title: str) -> None:
    """The steps' score heatmaps side by side on one symmetric colour scale."""
    plt = _pyplot()
    limit = _limit(*(s.artifact.tensors["scores"] for s in steps))
    shape = steps[0].artifact.tensors["scores"].shape
    columns = min(shape[1], MAX_COLUMNS)
    fig, axes = plt.subplots(1, len(steps), squeeze=False, layout="constrained",
                             figsize=(len(steps) * min(8.0, max(4.0, 0.35 * columns + 1.5)) + 1.5,
                                      min(8.0, max(3.4, 0.3 * shape[0] + 2.4))))
    image = None
    for ax, step in zip(axes[0], steps):
        meta = step.artifact.meta
        image = _draw_heatmap(ax, step.artifact.tensors["scores"], limit,
                              f"{step.name}: {step.label}\n{meta.get('target')}, {meta.get('objective')}",
                              meta.get("target", "heads"))
    fig.colorbar(image, ax=list(axes[0]), label="attribution (shared scale; < 0: useful)")
    fig.suptitle(f"{title}\n{SIGN_NOTE}", fontsize=9)
    _save(fig, path, tight=False)


def save_scatter(a: AttributionStep, b: AttributionStep, path: Path, label_a: str, label_b: str) -> None:
    """One run's scores against the other's, unit by unit, with Pearson and Spearman."""
    plt = _pyplot()
    x, y = a.scores.double().numpy(), b.scores.double().numpy()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(x, y, s=12, alpha=0.7)
    low, high = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
    ax.plot([low, high], [low, high], color="grey", lw=0.8, ls="--", label="y = x")
    ax.axhline(0, color="black", lw=0.5)
    ax.axvline(0, color="black", lw=0.5)
    ax.set_xlabel(f"A: {label_a}")
    ax.set_ylabel(f"B: {label_b}")
    ax.set_title(f"Pearson {pearson(a.scores, b.scores):.3f}, Spearman {spearman(a.scores, b.scores):.3f} "
                 f"({x.size} units)", fontsize=10)
    ax.legend(fontsize=8)
    _save(fig, path)


def save_curve(curves: dict[str, list[tuple[float, float]]], path: Path, title: str, ylabel: str = "objective",
               chosen: dict[str, float] | None = None, bands: dict[str, list[list[tuple[float, float]]]] | None = None) -> None:
    """Objective vs fraction pruned: one line per named curve; ``bands`` draws each group of curves
    (e.g. random prunes with several seeds) as its mean and min..max band; ``chosen`` marks the
    fraction each strategy pruned."""
    import numpy as np

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    colours = {}
    for name, group in (bands or {}).items():
        fractions = sorted({round(f, 6) for curve in group for f, _ in curve})
        rows = [[dict((round(f, 6), v) for f, v in curve).get(fr, np.nan) for fr in fractions] for curve in group]
        values = np.asarray(rows, dtype=float)
        line, = ax.plot(fractions, np.nanmean(values, 0), ls="--", marker=".", label=f"{name} (mean of {len(group)}, band min..max)")
        ax.fill_between(fractions, np.nanmin(values, 0), np.nanmax(values, 0), alpha=0.2, color=line.get_color())
        colours[name] = line.get_color()
    for name, points in curves.items():
        xs, ys = zip(*points) if points else ((), ())
        line, = ax.plot(xs, ys, marker="o", label=name)
        colours[name] = line.get_color()
    for name, fraction in (chosen or {}).items():
        ax.axvline(fraction, color=colours.get(name, "grey"), ls=":", lw=1.2, label=f"pruned by the step: {fraction:.3g}")
    ax.set_xlabel("fraction pruned")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_report(run_dir: Path, out_dir: Path, step: str | None = None) -> list[Path]:
    """Heatmaps of the run's attribution steps (one shared scale per target) and its prune curves."""
    written: list[Path] = []
    steps = attribution_steps(run_dir, step)
    for target in sorted({s.artifact.meta.get("target", "heads") for s in steps}):
        group = [s for s in steps if s.artifact.meta.get("target", "heads") == target]
        path = out_dir / f"{Path(run_dir).name}-{target}-heatmap.png"
        save_heatmaps(group, path, f"{Path(run_dir).name}: attribution per {target[:-1]}")
        written.append(path)
    prunes = prune_steps(run_dir, step)
    if any(p.get("curve") for p in prunes):
        path = out_dir / f"{Path(run_dir).name}-prune-curves.png"
        plot_prune_curves(prunes, path, Path(run_dir).name)
        written.append(path)
    return written


def plot_compare(run_a: Path, run_b: Path, out_dir: Path, step_a: str | None = None,
                 step_b: str | None = None) -> list[Path]:
    """Both runs' heatmaps on one colour scale and their scores' scatter (when both attribute), and
    the prune curves of both runs on one axis (when they prune)."""
    written: list[Path] = []
    stem = f"{Path(run_a).name}-vs-{Path(run_b).name}"
    atts_a, atts_b = attribution_steps(run_a, step_a), attribution_steps(run_b, step_b)
    if atts_a and atts_b:
        a, b = atts_a[-1], atts_b[-1]
        label_a, label_b = f"{Path(run_a).name}/{a.name} ({a.label})", f"{Path(run_b).name}/{b.name} ({b.label})"
        a.name, b.name = f"A {Path(run_a).name}/{a.name}", f"B {Path(run_b).name}/{b.name}"
        if a.scores.shape == b.scores.shape:
            path = out_dir / f"{stem}-heatmaps.png"
            save_heatmaps([a, b], path, f"{stem}: attribution, one colour scale")
            written.append(path)
            path = out_dir / f"{stem}-scatter.png"
            save_scatter(a, b, path, label_a, label_b)
            written.append(path)
    prunes = prune_steps(run_a) + prune_steps(run_b)
    if any(p.get("curve") for p in prunes):
        path = out_dir / f"{stem}-prune-curves.png"
        plot_prune_curves(prunes, path, stem)
        written.append(path)
    return written


def plot_prune_curves(prunes: list[dict[str, Any]], path: Path, title: str) -> None:
    """All prune steps' curves on one axis: random prunes as a band, others as lines, with the
    fraction each step pruned marked."""
    curves, bands, chosen = {}, {}, {}
    for p in prunes:
        if not p.get("curve"):
            continue
        points = [tuple(point) for point in p["curve"]]
        if p.get("strategy") == "random":
            bands.setdefault(f"random ({p.get('target')})", []).append(points)
            continue
        source = f" <- {p['attribution']}" if p.get("attribution") else ""
        run = f"{Path(p['run']).name}/" if len({q['run'] for q in prunes}) > 1 else ""
        label = f"{run}{p['name']}: {p['strategy']}{source}"
        curves[label] = points
        if p.get("fraction_pruned") is not None:
            chosen[label] = float(p["fraction_pruned"])
    objectives = sorted({str(p.get("objective") or "objective") for p in prunes})
    ylabel = f"{' / '.join(objectives)} loss on the prune step's data (lower is better)"
    save_curve(curves, path, f"{title}: prune curves", ylabel=ylabel, chosen=chosen, bands=bands)


def _save(fig: Any, path: Path, tight: bool = True) -> None:
    plt = _pyplot()
    if tight:
        fig.tight_layout(rect=(0, 0.03, 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
