"""The benchmark's JSON record and its section of ``RESULTS.md``."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shlex
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

from experiments.bench.measure import Measured

STAGES = ("attribution_teacher", "attribution_student", "select", "extract", "aligner_step", "aligner_step_weights",
          "lora_step")
PACKAGES = ("jax", "jaxlib", "torch", "transformers", "peft", "optax", "numpy", "pktjax")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(device: str) -> dict[str, Any]:
    info = {"cpu": _cpu_name(), "cpu_cores_usable": len(os.sched_getaffinity(0)),
            "ram_gb": round(psutil.virtual_memory().total / 2**30, 1), "os": platform.platform(),
            "load_average_1m": round(os.getloadavg()[0], 2),
            "python": platform.python_version()}
    if device == "gpu":
        import torch

        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = getattr(__import__(name), "__version__", "unknown") if name == "pktjax" else "absent"
    return out


def stage_entry(ours: Measured, theirs: Measured, agree: dict[str, Any],
                floor: Measured | None, torch_floor: Measured | None = None) -> dict[str, Any]:
    entry = {"pktjax_s": ours.median, "torch_s": theirs.median, "ratio": theirs.median / ours.median,
             "pktjax_peak_mb": round(ours.peak_mb, 1), "torch_peak_mb": round(theirs.peak_mb, 1),
             "pktjax_reps_s": ours.seconds, "torch_reps_s": theirs.seconds,
             "pktjax_first_call_s": ours.warmup_s, "torch_first_call_s": theirs.warmup_s,
             "pktjax_calls_per_rep": ours.calls_per_rep, "torch_calls_per_rep": theirs.calls_per_rep, **agree}
    if floor is not None:
        entry["matmul_floor_s"] = floor.median
        entry["pktjax_over_floor"] = ours.median / floor.median
        entry["torch_over_floor"] = theirs.median / floor.median
    if torch_floor is not None:
        entry["torch_matmul_floor_s"] = torch_floor.median
    return entry


def record(args, size, jax_res: dict[str, Measured], torch_res: dict[str, Measured], agree: dict[str, dict[str, Any]],
           wall_s: float, load_start: float, schedule: str) -> dict[str, Any]:
    """The JSON record: metadata, then one entry per stage (the attribution entries carry the matmul floors)."""
    stages = {}
    for name in STAGES:
        model = name.removeprefix("attribution_")
        floors = (jax_res[f"floor_{model}"], torch_res[f"floor_{model}"]) if model != name else (None, None)
        stages[name] = stage_entry(jax_res[name], torch_res[name], agree[name], *floors)
    return {
        "meta": {"size": args.size, "device": args.device, "reps": args.reps, "warmup": 1,
                 "jax_matmul_precision": getattr(args, "precision", "default"),
                 "threads": len(os.sched_getaffinity(0)), "schedule": schedule,
                 "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "command": "python -m experiments.bench " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
                 "wall_s": round(wall_s, 1),
                 "machine": {**machine(args.device), "load_average_1m_at_start": round(load_start, 2)},
                 "versions": versions(),
                 "teacher": size.teacher.as_dict(), "student": size.student.as_dict(), "note": size.note,
                 "workload": {"prompt_tokens": size.prompt_len, "train_tokens_max": size.train_len,
                              "aligner_examples": size.examples, "aligner_micro_batch": size.micro_batch,
                              "lora_batch": size.lora_batch, "lora_micro_batch": size.lora_micro,
                              "rate": size.rate, "chunk": size.chunk, "weights_stored_as": size.storage}},
        "stages": stages,
    }


def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) >= 1e-3 else f"{x:.2e}"


def _agreement_text(name: str, e: dict[str, Any]) -> str:
    if name.startswith("attribution_"):
        text = f"scores: max abs {_fmt(e['scores_max_abs_diff'])}, rel {_fmt(e['scores_max_rel_diff'])}"
        if "pktjax_vs_float64_max_rel" in e:
            text += (f"; vs float64: pktjax rel {_fmt(e['pktjax_vs_float64_max_rel'])}, torch rel "
                     f"{_fmt(e['torch_vs_float64_max_rel'])}")
        return text
    if name == "select":
        t, s = e["teacher"], e["student"]
        text = (f"identical: {e['selection_identical']} (FFN/attention neuron overlap T {t['ffn_neuron_overlap']:.3f}/"
                f"{t['attn_neuron_overlap']:.3f}, S {s['ffn_neuron_overlap']:.3f}/{s['attn_neuron_overlap']:.3f})")
        swapped = [f"{m} {kind}: {e[m][f'{kind}_slots_differ']}" for m in ("teacher", "student")
                   for kind in ("ffn", "attn") if e[m].get(f"{kind}_slots_differ")]
        if swapped:
            text += "; slots holding another neuron: " + ", ".join(swapped)
        if "pktjax_matches_float64" in t:
            text += "; equal to float64's selection: " + ", ".join(
                f"{side} {'T' if t[f'{side}_matches_float64'] else '-'}{'S' if s[f'{side}_matches_float64'] else '-'}"
                for side in ("pktjax", "torch"))
        return text
    if name == "extract":
        return f"knowledge max abs {_fmt(e['knowledge_max_abs_diff'])}"
    return (f"loss rel {_fmt(e['loss_rel_diff'])}, grad rel {_fmt(e['grad_max_rel_diff'])}, update abs "
            f"{_fmt(e['update_max_abs_diff'])} (rel {_fmt(e['update_max_rel_diff'])})")


def _threads(meta: dict[str, Any]) -> int:
    return meta.get("threads", meta["machine"]["cpu_cores_usable"])


def markdown_section(rec: dict[str, Any]) -> str:
    m = rec["meta"]
    hw = m["machine"]
    lines = [f"### `{m['size']}` on {m['device']}, {m['teacher']['layers']}/{m['student']['layers']} layers, "
             f"{_threads(m)} core(s) — {m['date']}", "",
             f"Command: `{m['command']}` (warm-up 1, {m['reps']} timed repetitions, median; frameworks timed "
             f"{m.get('schedule', 'one after the other')}; JAX float32 products at "
             f"`{m.get('jax_matmul_precision', 'default')}` precision; whole run {m['wall_s']:.0f} s).  ",
             f"Machine: {hw['cpu']}, {hw['cpu_cores_usable']} usable cores, {hw['ram_gb']} GB RAM"
             + (f", {hw['gpu']}" if "gpu" in hw else "")
             + f"; 1-minute load average {hw['load_average_1m_at_start']} at the start, "
               f"{hw['load_average_1m']} at the end.  ",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".  ",
             f"Pair: teacher {m['teacher']} → student {m['student']} ({m['note']}).  ",
             f"Workload: {m['workload']}.", "",
             "| stage | pktjax s | torch s | torch/pktjax | matmul floor s (JAX / torch) | pktjax/floor "
             "| pktjax peak MB | torch peak MB | agreement |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, e in rec["stages"].items():
        floor = e.get("matmul_floor_s")
        over = f"{e['pktjax_over_floor']:.2f}" if floor else "—"
        floor_text = f"{_fmt(floor)} / {_fmt(e['torch_matmul_floor_s'])}" if floor else "—"
        lines.append(f"| {name} | {_fmt(e['pktjax_s'])} | {_fmt(e['torch_s'])} | {e['ratio']:.2f} | "
                     f"{floor_text} | {over} | "
                     f"{e['pktjax_peak_mb']:.0f} | {e['torch_peak_mb']:.0f} | {_agreement_text(name, e)} |")
    return "\n".join(lines) + "\n"


def update_markdown(path: Path, rec: dict[str, Any], header: str) -> None:
    """Replace (or append) this size/device's section of ``path``, keeping the others."""
    m = rec["meta"]
    key = (f"{m['size']}/{m['device']}/layers-{m['teacher']['layers']}-{m['student']['layers']}"
           f"/threads-{_threads(m)}")
    start, end = f"<!-- run:{key} -->", f"<!-- end:{key} -->"
    block = f"{start}\n{markdown_section(rec)}{end}\n"
    text = path.read_text() if path.is_file() else header
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end) + r"\n?", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def write_json(path: Path, rec: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec, indent=1))


def main(argv: list[str] | None = None) -> None:
    """``python -m experiments.bench.report --markdown RESULTS.md FILE.json ...``: (re)write the sections of
    finished runs from their JSON records."""
    import argparse

    from experiments.bench.__main__ import HEADER, RESULTS_MD

    p = argparse.ArgumentParser(prog="python -m experiments.bench.report", description=main.__doc__)
    p.add_argument("records", type=Path, nargs="+")
    p.add_argument("--markdown", type=Path, default=RESULTS_MD)
    args = p.parse_args(argv)
    for path in args.records:
        update_markdown(args.markdown, json.loads(path.read_text()), HEADER)


if __name__ == "__main__":
    main()
