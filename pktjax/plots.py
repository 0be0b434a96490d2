"""Figures of the neural-incompatibility analysis (:mod:`pktjax.analysis`), written as PNG and PDF.

Uses matplotlib's object-oriented API with the Agg canvas, so it never opens a window and never changes the
caller's pyplot backend.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pktjax.analysis import heatmap_summary, triangle_mask

_INIT_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:purple")
_COMPARISONS = (("vs_original", "original", "-", "o"), ("vs_remaining", "remaining", "--", "s"))


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, stem: Path, dpi: int) -> list[Path]:
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    fig.savefig(paths[0], dpi=dpi)
    fig.savefig(paths[1])
    return paths


def plot_parametric(results: dict[str, dict[str, dict[str, np.ndarray]]], stem: str | Path,
                    dpi: int = 110) -> list[Path]:
    """Per-layer cosine curves, one panel per module.

    ``results``: ``{init name: {module: {"vs_remaining": [L], "vs_original": [L]}}}`` (e.g. PiSSA and Seeking).
    Solid lines: LoRA init vs the original weight; dashed: vs the remaining weight; the legend gives each mean.
    Writes ``stem.png`` and ``stem.pdf`` and returns their paths.
    """
    modules = list(dict.fromkeys(m for per in results.values() for m in per))
    cols = min(len(modules), 2)
    rows = -(-len(modules) // cols)
    fig = _figure(5.6 * cols, (3.0 + 0.32 * 2 * len(results)) * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, module in zip(axes, modules):
        for colour, (init, per) in zip(_INIT_COLOURS, results.items()):
            if module in per:
                _curves(ax, per[module], init, colour)
        ax.axhline(0.0, color="0.6", lw=0.8, zorder=0)
        ax.set(title=module, xlabel="student layer", ylabel="cosine similarity")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=2, frameon=False)
    for ax in axes[len(modules):]:
        ax.set_visible(False)
    fig.suptitle("Cosine of the LoRA initialisation BA with the student's weights, per layer")
    return _save(fig, stem, dpi)


def _curves(ax, res: dict[str, np.ndarray], init: str, colour: str) -> None:
    for key, label, style, marker in _COMPARISONS:
        y = np.asarray(res[key])
        ax.plot(np.arange(len(y)), y, style, color=colour, marker=marker, ms=3, lw=1.4,
                label=f"{init} LoRA vs {label} (mean {round(float(y.mean()), 3) + 0.0:+.3f})")


def plot_heatmaps(mats: dict[str, np.ndarray], stem: str | Path, metric: str = "cka", *,
                  teacher_label: str = "teacher", student_label: str = "student", triangle: bool = True,
                  dpi: int = 110) -> list[Path]:
    """Layer-by-layer heatmaps ``[L_S, L_T]`` (rows: student layers, columns: teacher layers), one per module,
    each with its mean and std in a corner box. ``triangle`` shows only cells with teacher index ≥ student
    index. Colours span [0, 1] for CKA and [−1, 1] for the cosine metric. Writes ``stem.png`` and ``stem.pdf``."""
    n = len(mats)
    cols = min(n, 2)
    rows = -(-n // cols)
    ls, lt = next(iter(mats.values())).shape
    panel_w, panel_h = 3.2 + 0.12 * lt, 2.4 + 0.12 * ls
    fig = _figure(panel_w * cols, panel_h * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (module, mat) in zip(axes, mats.items()):
        _heatmap(fig, ax, np.asarray(mat, np.float64), module, metric, teacher_label, student_label, triangle)
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle(_METRIC_TITLES.get(metric, metric) + " of module outputs, per layer pair")
    return _save(fig, stem, dpi)


_METRIC_TITLES = {"cka": "Linear CKA", "cosine": "Mean cosine of token-similarity profiles"}


def _heatmap(fig, ax, mat, module, metric, teacher_label, student_label, triangle) -> None:
    shown = np.where(triangle_mask(mat.shape), mat, np.nan) if triangle else mat
    from matplotlib import colormaps

    name, lo = ("viridis", 0.0) if metric == "cka" else ("RdBu_r", -1.0)
    cmap = colormaps[name].with_extremes(bad="0.88")  # hidden cells in grey, apart from any value
    im = ax.imshow(shown, cmap=cmap, vmin=lo, vmax=1.0, aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.9, label=metric)
    ax.set(title=f"{student_label} vs {teacher_label}: {module}", xlabel=f"{teacher_label} layer",
           ylabel=f"{student_label} layer")
    _integer_ticks(ax, mat.shape)
    s = heatmap_summary(mat, triangle)
    # With the triangle shown, the lower-left corner is empty: the box goes there.
    xy, ha, va = ((0.03, 0.04), "left", "bottom") if triangle else ((0.97, 0.96), "right", "top")
    ax.text(*xy, f"mean {s['mean']:.3f}\nstd  {s['std']:.3f}", transform=ax.transAxes, ha=ha, va=va,
            fontsize=9, family="monospace", bbox=dict(boxstyle="round", facecolor="white", alpha=0.9))


def _integer_ticks(ax, shape: tuple[int, int]) -> None:
    from matplotlib.ticker import MaxNLocator

    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(MaxNLocator(nbins=10, integer=True))


_SEED_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def plot_score_vs_delta(points, stem: str | Path, references: dict[str, float] | None = None,
                        dpi: int = 110) -> list[Path]:
    """Score against the relative size of the injected deltas, one point per fused LaTen student.

    ``points``: ``(group, seed, step, relative size, score)`` tuples (group: e.g. the method with its learning
    rate; one colour each, one marker per seed, the aligner step written beside each point), optionally with a
    sixth entry, the fraction of the student's outputs unlike the base student's (``None`` where unknown): then a
    second panel below, on the same x axis, shows that fraction, which says at what size the student starts to
    differ at all. ``references``: ``{label: score}`` drawn as horizontal lines (the base student and teacher).
    The x axis is logarithmic. Writes ``stem.png`` and ``stem.pdf`` and returns their paths.
    """
    points = [tuple(p) + (None,) * (6 - len(p)) for p in points]
    if not points or any(p[3] <= 0 for p in points):
        raise ValueError("plot_score_vs_delta needs at least one point, each with a positive relative size.")
    changed = any(p[5] is not None for p in points)
    fig = _figure(6.4, 6.4 if changed else 4.2)
    axes = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2)) if changed else [fig.subplots()]
    groups = list(dict.fromkeys(p[0] for p in points))
    seeds = list(dict.fromkeys(p[1] for p in points))
    for colour, group in zip(_INIT_COLOURS * len(groups), groups):
        for marker, seed in zip(_SEED_MARKERS * len(seeds), seeds):
            mine = sorted((p for p in points if p[0] == group and p[1] == seed), key=lambda p: p[2])
            for ax, y in zip(axes, (4, 5)):
                shown = [p for p in mine if p[y] is not None]
                if not shown:
                    continue
                ax.plot([p[3] for p in shown], [p[y] for p in shown], ls=":", lw=0.8, color=colour, marker=marker,
                        ms=5, label=f"{group}, seed {seed}" if y == 4 else None)
                for p in shown:
                    ax.annotate(str(p[2]), (p[3], p[y]), textcoords="offset points", xytext=(3, 3), fontsize=7,
                                color=colour)
    for (label, score), style in zip((references or {}).items(), ("--", "-.", ":")):
        axes[0].axhline(score, color="0.35", ls=style, lw=1.0, label=f"{label} ({score:.3f})")
    axes[0].set_xscale("log")
    axes[0].set(ylabel="score", title="LaTen students: score against delta size (numbers: aligner step)")
    if changed:
        axes[1].set(ylabel="outputs unlike\nthe base student's", ylim=(-0.03, 1.03))
    axes[-1].set(xlabel="RMS of injected deltas / RMS of the weights they change")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[-1].legend(*axes[0].get_legend_handles_labels(), fontsize=7, loc="upper center",
                    bbox_to_anchor=(0.5, -0.25 if changed else -0.18), ncols=2, frameon=False)
    return _save(fig, stem, dpi)


def plot_alignment_cka(curves: dict[str, np.ndarray], stem: str | Path, layer: int,
                       paired: tuple[int, ...] = (), module: str = "down_proj", dpi: int = 110) -> list[Path]:
    """SemAlign's before / after view: CKA of student layer ``layer`` (from 1, as labelled) with each teacher
    layer (from 1), one line per entry of ``curves`` (``{"before": [L_T], "after": [L_T]}``); ``paired`` marks the
    teacher layers the target interpolates. Writes ``stem.png`` and ``stem.pdf``."""
    fig = _figure(6.0, 3.4)
    ax = fig.subplots()
    for (name, y), style in zip(curves.items(), ("--o", "-s", ":^")):
        y = np.asarray(y, np.float64)
        ax.plot(np.arange(1, len(y) + 1), y, style, ms=3, lw=1.4, label=f"{name} alignment (mean {y.mean():.3f})")
    for t in paired:
        ax.axvline(t, color="0.6", lw=0.8, zorder=0)
    ax.set(title=f"student layer {layer} ({module}) vs every teacher layer", xlabel="teacher layer",
           ylabel="linear CKA", ylim=(0.0, 1.02))
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, stem, dpi)
