"""``pktjax seeking extract``: Seeking's extraction (SPEC §4) from a teacher into a LoRA of the student's shape."""

from __future__ import annotations

import argparse

from pktjax.commands import task_argument
from pktjax.settings import DeviceSettings, SeekingSettings, add_arguments, from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("seeking", help="Seeking (Post-Align PKT): extract teacher knowledge as a student LoRA")
    seeking = p.add_subparsers(dest="seeking_command", required=True)
    e = seeking.add_parser("extract", help="sensitivity on seed examples, layer and sub-matrix selection, SVD")
    e.add_argument("--teacher", required=True, help="teacher checkpoint folder or .gguf (the larger model)")
    e.add_argument("--student", required=True, help="student checkpoint folder or .gguf (only its config is read)")
    task_argument(e, "data", required=True, help="gsm | mmlu | super_ni | lima (the shipped seed samples) or a JSONL")
    e.add_argument("--out", required=True, help="new folder for the extracted adapter (PEFT format)")
    add_arguments(e, SeekingSettings, ("rank", "targets", "samples", "cutoff_len"),
                  rank={"help": "SVD rank r of the extracted factors"},
                  samples={"help": "seed examples to read (the shipped files hold 32)"},
                  cutoff_len={"help": "tokens per seed example at most"})
    add_arguments(e, DeviceSettings, ("mesh", "dtype"))
    e.set_defaults(func=_extract)


def _extract(args: argparse.Namespace) -> int:
    from pktjax.checkpoint import read_model_config
    from pktjax.workflows import extract_to

    from_args(SeekingSettings, args)  # --rank 0, --samples 0, --cutoff-len 0 are refused before any work
    cut = extract_to(args.teacher, args.student, read_model_config(args.student), args.task, args.out, rank=args.rank,
                     targets=args.targets, samples=args.samples, cutoff_len=args.cutoff_len, dtype=args.dtype,
                     mesh=args.mesh)
    print(f"teacher layers {cut['layers']} -> student layers 0..{len(cut['layers']) - 1}")
    print(f"extracted rank-{args.rank} adapter in {args.out}; train on it with "
          f"'pktjax lora train --init seeking:{args.out} ...'")
    return 0
