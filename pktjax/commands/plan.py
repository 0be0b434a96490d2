"""``pktjax plan``: per-device memory of LaTen (locate + aligner training) for a teacher/student pair on a mesh.
The memory model and its formulas: :mod:`pktjax.memory`."""

from __future__ import annotations

import argparse

from pktjax.commands import list_argument
from pktjax.settings import AlignerTrainConfig, add_arguments


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="per-device memory of LaTen for a teacher/student pair on a device mesh")
    p.add_argument("--teacher", required=True, help="config.json, checkpoint folder or preset (e.g. llama-2-13b)")
    p.add_argument("--student", required=True, help="config.json, checkpoint folder or preset (e.g. llama-2-7b)")
    p.add_argument("--mesh", default="fsdp=1", help="mesh axes, e.g. 'fsdp=8' or 'data=2,fsdp=2,tensor=2'")
    p.add_argument("--devices", type=int, default=None, help="device count (needed only with a -1 axis size)")
    p.add_argument("--device-memory-gb", type=float, default=80.0, help="memory of one device in GiB")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="dtype of the teacher and student weights")
    add_arguments(p, AlignerTrainConfig, ("rate", "micro_batch", "cutoff_len"))
    p.add_argument("--p-examples", type=int, default=AlignerTrainConfig.examples_per_step,
                   help="examples in each aligner step's loss (P) (default: %(default)s)")
    p.add_argument("--chunk", type=int, default=512, help="neurons per attribution block")
    list_argument(p, "--modules", default=None,
                  help="transferred modules (default: up,down,v,o; without v_proj for GQA)")
    p.set_defaults(func=_plan)


def _plan(args: argparse.Namespace) -> int:
    from pktjax.memory import PlanInput, check_input, mesh_sizes, plan, render
    from pktjax.presets import load_config

    sizes = mesh_sizes(args.mesh, args.devices)
    inp = PlanInput(teacher=load_config(args.teacher), student=load_config(args.student), mesh=sizes,
                    dtype=args.dtype, device_gib=args.device_memory_gb, rate=args.rate, p_examples=args.p_examples,
                    micro_batch=args.micro_batch, cutoff_len=args.cutoff_len, chunk=args.chunk, modules=args.modules)
    check_input(inp)
    print(render(inp, plan(inp), (args.teacher, args.student)))
    return 0
