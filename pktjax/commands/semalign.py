"""``pktjax semalign train``: SemAlign (knowledge moved through layer outputs) from a teacher into one student layer."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from pktjax.settings import (DEFAULT_DTYPE, DeviceSettings, LoraTrainConfig, SemalignSettings, TrackingSettings,
                                 add_arguments)

    p = sub.add_parser("semalign", help="SemAlign: align one student layer with the teacher's recomposed outputs")
    sem = p.add_subparsers(dest="semalign_command", required=True)
    t = sem.add_parser("train", help="attribution, pairing, recomposed targets, training of the paired layer "
                                     "(resumes when --out holds checkpoints)")
    t.add_argument("--teacher", required=True, help="teacher checkpoint folder or .gguf (the larger model)")
    t.add_argument("--student", required=True, help="student checkpoint folder or .gguf (same vocabulary)")
    t.add_argument("--task", required=True, help="training data: gsm | mmlu | humaneval | mbpp (the LaTen train "
                   "split), super_ni | lima (the Seeking 1000 examples) or a JSONL file")
    t.add_argument("--out", required=True, help="output folder: plan.json, adapter/ or model/, checkpoints/, "
                   "metrics.jsonl, semalign.json")
    # the settings of a transfer config's `semalign:` section, as flags
    add_arguments(t, SemalignSettings, ("mode", "compare", "frame", "layer", "targets", "epochs", "lr", "batch_size",
                                        "micro_batch", "rank", "alpha", "dropout", "cutoff_len", "limit", "seed_data",
                                        "teacher_dtype", "samples", "cka"),
                  seed_data={"help": "attribution examples (default: the task's Seeking samples, else the first "
                                     "--seed-samples training examples)"},
                  teacher_dtype={"default": DEFAULT_DTYPE, "help": "storage dtype of the teacher's weights"},
                  samples={"flag": "--seed-samples", "help": "attribution examples used"},
                  cka={"metavar": "N", "help": "also plot the before / after CKA of the trained layer with every "
                                               "teacher layer on the first N training examples (alignment_cka.png)"})
    add_arguments(t, LoraTrainConfig, ("dtype", "seed", "save_every"))
    add_arguments(t, DeviceSettings, ("mesh",))
    add_arguments(t, TrackingSettings)
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    import dataclasses

    from pktjax import sharding as S
    from pktjax.checkpoint import read_model_config
    from pktjax.data import LATEN_TASKS, laten_split, read_jsonl
    from pktjax.seeking import task_file
    from pktjax.settings import SemalignSettings, TrackingSettings, as_dict, from_args
    from pktjax.tracking import open_tracker
    from pktjax.transfer.config import semalign_config
    from pktjax.workflows import check_semalign_pair, seed_examples, seed_file, train_semalign

    sec = from_args(SemalignSettings, args)  # --seed-samples 0, --cka -1, ... are refused here
    tracking = from_args(TrackingSettings, args)
    tc = dataclasses.replace(sec.trainer(args.seed, args.task), save_every=args.save_every)
    tc.validate()
    sc = semalign_config(sec)
    check_semalign_pair(read_model_config(args.teacher), read_model_config(args.student), sc)
    data = laten_split(args.task, "train") if args.task in LATEN_TASKS else task_file(args.task, "train")
    examples = read_jsonl(data, limit=sec.limit)
    seeds = seed_examples(sec.seed_data or args.task, sec.samples)
    with open_tracker(tracking.tracker, args.out, config=as_dict(sec)) as tracker:
        _, info = train_semalign(args.teacher, args.student, seeds, examples, Path(args.out), tc, sc,
                                 teacher_dtype=sec.teacher_dtype, progress=not args.no_progress,
                                 mesh=S.as_mesh(args.mesh), probe=examples[:sec.cka],
                                 data_files=[data, seed_file(sec.seed_data or args.task)], tracker=tracker)
    p = info["pairing"]
    S.main_print(f"critical teacher layer {p['critical']} -> student layer {p['student_layer']} (teacher "
                 f"{p['a']}/{p['b']}, lambda {p['lam']:.3f}); output in {info.get('adapter') or info.get('model')}")
    return 0
