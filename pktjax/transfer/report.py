"""The transfer job's report: ``scores.json``, ``report.md``, ``aligner_curves.png`` and ``delta_vs_score.png``."""

from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Any, Sequence

from pktjax.provenance import provenance
from pktjax.runfolder import atomic_write, read_json, read_jsonl, read_text, write_json
from pktjax.tasks.common import mcnemar_exact
from pktjax.transfer.config import TransferConfig


def _write_json(path: Path, obj: Any) -> None:
    write_json(path, obj, checksum=True)


def write_report(cfg: TransferConfig, rows: list[dict[str, Any]], timings: dict[str, float],
                 analysis: Path | None = None, data_files: Sequence[str | os.PathLike] = (),
                 left: Sequence[str] = ()) -> Path:
    """``scores.json``, ``aligner_curves.png`` and ``report.md`` (scores with CIs, the spread over seeds, the
    analysis figures and numbers when there is an ``analysis`` folder). Each trained model's row also gets
    ``vs_student``, its example-by-example comparison with the base student (:func:`vs_student`).
    ``scores.json`` carries the ``provenance`` of the report (:mod:`pktjax.provenance`): the config's hash and
    the hashes of ``data_files``, the files the job read; with an output URL its rows' ``report`` name the
    evaluations at that URL. ``left``: the stages still to run, for an interim report written between stages
    (said at its top and in ``scores.json``'s ``left``); the finished run's report has none."""
    base = next((r["report"] for r in rows if r["method"] == "base student"), None)
    rows = [dict(r, vs_student=vs_student(base, r["report"])) if base and r["seed"] is not None else r
            for r in rows]
    _write_json(cfg.out / "scores.json", {"rows": [dict(r, report=_located(cfg, r["report"])) for r in rows],
                                          "timings": timings, "provenance": provenance(cfg.raw, data_files),
                                          **({"left": list(left)} if left else {})})
    curves = plot_aligner_curves(cfg.out)
    deltas = _plot_deltas(cfg.out, rows)
    lines = [f"# Transfer report: {cfg.task} ({cfg.eval_task})", "",
             f"teacher `{cfg.teacher}` → student `{cfg.student}`", "", *_interim_note(left), *_weights_note(cfg),
             "Δ/W: root mean square of a LaTen student's injected deltas over that of the student weights they "
             "are added to (all modules pooled; per module below).", "",
             "| method | seed | aligner step | score | 95% CI | n | Δ/W |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ci = r.get("ci") or [None, None]
        ci_txt = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci[0] is not None else "—"
        lines.append(f"| {r['method']} | {r['seed'] if r['seed'] is not None else '—'} | "
                     f"{r['step'] if r['step'] is not None else '—'} | {r['score']:.3f} | {ci_txt} | {r.get('n')} | "
                     f"{_relative(r.get('delta'), 'all')} |")
    lines += ["", *_seed_summary(rows), "", *_paired_section(rows), "", *_delta_section(rows, deltas), "",
              "## Timings (s; a resumed stage adds the time of its earlier tries)", ""]
    lines += [f"- {k}: {v:.1f}" for k, v in timings.items()]
    if curves:
        lines += ["", f"![aligner curves]({curves.name})"]
    cka = sorted(cfg.out.glob("semalign/seed*/alignment_cka.png"))
    if cka:
        lines += ["", "## SemAlign: CKA of the trained layer with every teacher layer, before / after alignment", "",
                  *[f"![{p.parent.name}]({p.relative_to(cfg.out)})" for p in cka]]
    if analysis is not None:
        lines += ["", *_analysis_section(cfg.out, analysis)]
    return atomic_write(cfg.out / "report.md", "\n".join(lines) + "\n", checksum=True)


def _located(cfg: TransferConfig, path: str) -> str:
    """A file of the run where its readers find it: with an output URL (``cfg.remote``), the staging folder's
    file at that URL (``gs://bucket/run/eval/student.json``); else the path itself."""
    if cfg.remote is None or not Path(path).is_relative_to(cfg.out):
        return path
    return f"{cfg.remote}/{Path(path).relative_to(cfg.out).as_posix()}"


def _relative(delta: dict[str, Any] | None, module: str) -> str:
    size = (delta or {}).get(module)
    return "—" if size is None or size.get("relative") is None else f"{size['relative']:.2e}"


def _delta_section(rows: list[dict[str, Any]], figure: Path | None) -> list[str]:
    """Per LaTen row: each module's injected-delta RMS and its ratio to the weights' RMS (empty without them)."""
    rows = [r for r in rows if r.get("delta")]
    if not rows:
        return []
    modules = [m for m in rows[0]["delta"] if m != "all"]
    out = ["## Size of the injected deltas", "",
           "Per module: RMS of the deltas added by the fuse, and (in brackets) that RMS over the RMS of the student "
           "weights at the same rows / columns. The aligner's logs hold the same figures for every training step.",
           "", "| method | seed | aligner step | score | " + " | ".join(modules) + " | all |",
           "|---|---|---|---|" + "---|" * (len(modules) + 1)]
    for r in rows:
        cells = [f"{r['delta'][m]['rms']:.2e} ({_relative(r['delta'], m)})" for m in (*modules, "all")]
        out.append(f"| {r['method']} | {r['seed']} | {r['step']} | {r['score']:.3f} | " + " | ".join(cells) + " |")
    if figure is not None:
        out += ["", f"![score against delta size]({figure.name})"]
    return out


def _plot_deltas(out: Path, rows: list[dict[str, Any]]) -> Path | None:
    """``delta_vs_score.png``: each LaTen student's score, and the share of its outputs unlike the base student's,
    against its pooled relative delta size."""
    from pktjax.plots import plot_score_vs_delta

    points = [(r["method"], r["seed"], r["step"], r["delta"]["all"]["relative"], r["score"],
               r["vs_student"]["changed"] / r["vs_student"]["n"] if r.get("vs_student") else None)
              for r in rows if r.get("delta") and r["delta"]["all"].get("relative")]
    if not points:
        return None
    refs = {r["method"]: r["score"] for r in rows if r["method"] in ("base student", "base teacher")}
    return plot_score_vs_delta(points, out / "delta_vs_score", refs)[0]


def _interim_note(left: Sequence[str]) -> list[str]:
    if not left:
        return []
    return [f"**Interim report**: the run has stages left ({', '.join(left)}); rerun its command to go on.", ""]


def _weights_note(cfg: TransferConfig) -> list[str]:
    """A line saying when the scores are those of GGUF (usually quantized) weights."""
    gguf = [name for name, spec in (("teacher", cfg.teacher), ("student", cfg.student))
            if spec.startswith("registry:") or spec.endswith(".gguf")]
    if not gguf:
        return []
    return [f"The {' and '.join(gguf)} weights come from GGUF files (the packaged pair: 4-bit-class "
            "quantizations), dequantized to float32 on load: every score here is that of the quantized model.", ""]


def _analysis_section(out: Path, folder: Path) -> list[str]:
    """The analysis' own report (headings one level down) and its figures, linked relative to ``out``."""
    text = read_text(folder / "report.md", "analysis report").splitlines()
    body = ["#" + line if line.startswith("#") else line for line in text]
    figures = sorted(folder.glob("representation_*.png")) + sorted(folder.glob("parametric_similarity.png"))
    rel = folder.relative_to(out)
    return [*body, "", *[f"![{p.stem.replace('_', ' ')}]({rel / p.name})" for p in figures],
            "", f"Every number: [{rel / 'analysis.json'}]({rel / 'analysis.json'})."]


def _seed_summary(rows: list[dict[str, Any]]) -> list[str]:
    """Mean and spread over seeds of each trained method's score (per aligner step for LaTen)."""
    groups: dict[tuple[str, Any], list[float]] = {}
    for r in rows:
        if r["seed"] is not None:
            groups.setdefault((r["method"], r["step"]), []).append(r["score"])
    out = ["## Spread over seeds", "", "| method | aligner step | seeds | mean | std | min | max |",
           "|---|---|---|---|---|---|---|"]
    for (method, step), xs in groups.items():
        sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
        out.append(f"| {method} | {step if step is not None else '—'} | {len(xs)} | {statistics.mean(xs):.3f} | "
                   f"{sd:.3f} | {min(xs):.3f} | {max(xs):.3f} |")
    return out


def vs_student(base_report: str | os.PathLike, report: str | os.PathLike) -> dict[str, Any] | None:
    """A trained model against the base student on the same examples: ``gained`` (solved here only), ``lost``
    (solved by the base student only), ``changed`` (outputs unlike the base student's), ``n`` and ``p``, the exact
    McNemar test of gained against lost. ``None`` when the two evaluations did not score the same example ids."""
    base, new = ({r["id"]: r for r in read_json(f, "evaluation report")["records"]} for f in (base_report, report))
    if base.keys() != new.keys():
        return None
    gained = sum(bool(new[k]["correct"]) and not base[k]["correct"] for k in base)
    lost = sum(bool(base[k]["correct"]) and not new[k]["correct"] for k in base)
    changed = sum(new[k]["output"] != base[k]["output"] for k in base)
    return {"gained": gained, "lost": lost, "changed": changed, "n": len(base), "p": mcnemar_exact(gained, lost)}


def _paired_section(rows: list[dict[str, Any]]) -> list[str]:
    """The ``vs_student`` comparisons as a table (empty without trained rows)."""
    rows = [r for r in rows if "vs_student" in r]
    if not rows:
        return []
    out = ["## Against the base student, example by example", "",
           "gained: solved here and not by the base student; lost: the reverse; changed: outputs unlike the base "
           "student's; p: exact two-sided McNemar test of gained against lost.", "",
           "| method | seed | aligner step | gained | lost | changed | p |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        v, step = r["vs_student"], r["step"] if r["step"] is not None else "—"
        cells = ("— (other examples)",) * 4 if v is None else (
            v["gained"], v["lost"], f"{v['changed']} of {v['n']}", f"{v['p']:.3f}")
        out.append(f"| {r['method']} | {r['seed']} | {step} | " + " | ".join(map(str, cells)) + " |")
    return out


def plot_aligner_curves(out: Path) -> Path | None:
    """Loss, CE and MSE per aligner step for every seed, from each run's ``log.jsonl``."""
    logs = sorted((out / "laten").glob("**/seed*/aligner/log.jsonl"))
    if not logs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    keys = ("loss", "ce", "mse", "Δ/W")  # Δ/W: the checkpoint's injected deltas over the weights (all modules)
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    for log in logs:
        recs = read_jsonl(log, on_bad="trim")
        for r in recs:
            if (r.get("delta") or {}).get("all", {}).get("relative"):
                r["Δ/W"] = r["delta"]["all"]["relative"]
        for ax, key in zip(axes, keys):
            pts = [(r["step"], r[key]) for r in recs if key in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", label="/".join(log.relative_to(out / "laten").parts[:-2]))
    for ax, key in zip(axes, keys):
        ax.set_xlabel("aligner step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(key)
        ax.grid(alpha=0.3)
        if key == "Δ/W" and ax.has_data():
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path = out / "aligner_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
