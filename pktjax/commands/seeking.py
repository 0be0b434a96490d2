"""``pktjax seeking extract``: Seeking's extraction (SPEC §4) from a teacher into a LoRA of the student's shape."""

from __future__ import annotations

import argparse

from pktjax.commands import list_argument, task_argument
from pktjax.settings import DeviceSettings, SeekingSettings, add_arguments


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("seeking", help="Seeking (Post-Align PKT): extract teacher knowledge as a student LoRA")
    seeking = p.add_subparsers(dest="seeking_command", required=True)
    e = seeking.add_parser("extract", help="sensitivity on seed examples, layer and sub-matrix selection, SVD")
    e.add_argument("--teacher", required=True, help="teacher checkpoint folder or .gguf (the larger model)")
    e.add_argument("--student", required=True, help="student checkpoint folder or .gguf (only its config is read)")
    task_argument(e, "data", required=True, help="gsm | mmlu | super_ni | lima (the shipped seed samples) or a JSONL")
    e.add_argument("--out", required=True, help="new folder for the extracted adapter (PEFT format)")
    e.add_argument("--rank", type=int, default=SeekingSettings.rank,
                   help="SVD rank r of the extracted factors (default: %(default)s)")
    add_targets_argument(e)
    e.add_argument("--samples", type=int, default=SeekingSettings.samples,
                   help="seed examples to read (the shipped files hold 32; default: %(default)s)")
    e.add_argument("--cutoff-len", type=int, default=SeekingSettings.cutoff_len,
                   help="tokens per seed example at most (default: %(default)s)")
    add_arguments(e, DeviceSettings, ("mesh", "dtype"))
    e.set_defaults(func=_extract)


def add_targets_argument(p: argparse.ArgumentParser) -> None:
    list_argument(p, "--targets", default=None,
                  help="modules to adapt among q_proj k_proj v_proj o_proj gate_proj up_proj down_proj embed_tokens "
                       "lm_head (default: all nine)")


def _extract(args: argparse.Namespace) -> int:
    from pktjax.checkpoint import read_model_config
    from pktjax.workflows import extract_to

    cut = extract_to(args.teacher, args.student, read_model_config(args.student), args.task, args.out, rank=args.rank,
                     targets=args.targets, samples=args.samples, cutoff_len=args.cutoff_len, dtype=args.dtype,
                     mesh=args.mesh)
    print(f"teacher layers {cut['layers']} -> student layers 0..{len(cut['layers']) - 1}")
    print(f"extracted rank-{args.rank} adapter in {args.out}; train on it with "
          f"'pktjax lora train --init seeking:{args.out} ...'")
    return 0
