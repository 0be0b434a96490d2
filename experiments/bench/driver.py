"""Runs every stage in both frameworks, either in turns (both pairs loaded at once) or one framework after the
other (when the two copies of the pair do not fit together, as with the full Llama-2 shapes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from experiments.bench.measure import log, measure_jobs
from experiments.bench.pktjax_phase import PktjaxPhase, selection_from
from experiments.bench.torch_phase import TorchPhase
from experiments.bench.workload import Workload

STAGES = ("attribution_teacher", "attribution_student", "floor_teacher", "floor_student", "select", "extract",
          "aligner_step", "aligner_step_weights", "lora_step")


def _log(stage: str, framework: str, m) -> None:
    log(f"{framework:6s} {stage:20s} median {m.median:.4g} s (first call {m.warmup_s:.3g} s, peak {m.peak_mb:.0f} MB)")


def _before(stage: str, tp: TorchPhase | None, jp: PktjaxPhase | None, shared: dict[str, Any]) -> None:
    """What a stage needs first: the float64 reference before LoRA touches the student, and the baseline's
    selection, which both frameworks extract and align with (so that their steps are comparable)."""
    if stage == "select" and tp is not None and shared["float64"]:
        shared["f64"] = tp.float64_scores()
        log("torch  float64 reference scores done")
    if stage == "extract":
        if tp is not None:
            tp.picked = tp.results["select"].output
            shared["picked"] = [{k: v.cpu().numpy() for k, v in p.as_dict().items()} for p in tp.picked]
        if jp is not None:
            jp.picked = tuple(selection_from(p) for p in shared["picked"])


def _outputs(phase, shared: dict[str, Any]) -> dict[str, Any]:
    return {**phase.outputs(), "lora_step": phase.lora_exact(), "float64": shared.get("f64")}


def interleaved(dirs: tuple[Path, Path], size, work: Workload, device: str, reps: int, float64: bool):
    """Both frameworks loaded; every stage's repetitions alternate between them."""
    tp, jp = TorchPhase(*dirs, size, work, device), PktjaxPhase(*dirs, size, work, device)
    shared: dict[str, Any] = {"float64": float64}
    for stage in STAGES:
        _before(stage, tp, jp, shared)
        tm, jm = measure_jobs([tp.job(stage), jp.job(stage)], reps)
        tp.results[stage], jp.results[stage] = tm, jm
        _log(stage, "torch", tm)
        _log(stage, "pktjax", jm)
    outs = _outputs(tp, shared), _outputs(jp, shared)
    results = tp.results, jp.results
    tp.close()
    jp.close()
    return outs, results


def sequential(dirs: tuple[Path, Path], size, work: Workload, device: str, reps: int, float64: bool):
    """The baseline's stages, its pair freed, then pktjax's stages."""
    shared: dict[str, Any] = {"float64": float64}
    outs, results = [], []
    for make in (TorchPhase, PktjaxPhase):
        phase = make(*dirs, size, work, device)
        for stage in STAGES:
            _before(stage, phase if make is TorchPhase else None, phase if make is PktjaxPhase else None, shared)
            phase.results[stage] = measure_jobs([phase.job(stage)], reps)[0]
            _log(stage, "torch" if make is TorchPhase else "pktjax", phase.results[stage])
        outs.append(_outputs(phase, shared))
        results.append(phase.results)
        phase.close()
    return tuple(outs), tuple(results)
