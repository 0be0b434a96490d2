"""``pktjax plan``: per-device memory of LaTen (locate + aligner training) for a teacher/student pair on a mesh,
given as ``--teacher``/``--student`` or as a transfer config (``pktjax plan CONFIG.yaml``: its models, ``mesh``,
``dtype``, ``device_memory_gb`` and ``laten`` sizes; flags given here override them). ``pktjax transfer`` refuses
a config this plan says cannot fit. The memory model and its formulas: :mod:`pktjax.memory`."""

from __future__ import annotations

import argparse

from pktjax.settings import DEFAULT_DTYPE, AlignerTrainConfig, DeviceSettings, LatenSettings, add_arguments

DEVICE_GIB = 80.0  # the device memory planned for without a config that says otherwise (an A100/H100 80 GB)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="per-device memory of LaTen for a teacher/student pair (or a transfer config) "
                                    "on a device mesh")
    p.add_argument("config", nargs="?", default=None,
                   help="a transfer config (YAML/JSON): plan its job (flags given here override its settings)")
    p.add_argument("--teacher", help="config.json, checkpoint folder or preset (e.g. llama-2-13b)")
    p.add_argument("--student", help="config.json, checkpoint folder or preset (e.g. llama-2-7b)")
    p.add_argument("--devices", type=int, default=None, help="device count (needed only with a -1 axis size)")
    # without a default here: a flag left out takes the config's value, else the setting's default
    add_arguments(p, DeviceSettings, ("mesh", "dtype", "device_memory_gb"), mesh={
        "help": "mesh axes, e.g. 'fsdp=8' or 'data=2,fsdp=2,tensor=2' (default: the config's, else one device)"},
        dtype={"default": None, "help": f"storage dtype of the teacher and student weights (default: the config's, "
                                        f"else {DEFAULT_DTYPE})"},
        device_memory_gb={"help": f"memory of one device in GiB (default: the config's device_memory_gb, else "
                                  f"{DEVICE_GIB:g})"})
    laten = {"rate": "fraction of student neurons transferred per layer",
             "micro_batch": "examples per compiled forward/backward", "cutoff_len": "tokens per example (T)",
             "examples_per_step": "examples in each aligner step's loss (P)"}
    custom = {k: {"default": None, "help": f"{h} (default: the config's laten.{k}, else "
                                           f"{getattr(AlignerTrainConfig, k)})"} for k, h in laten.items()}
    custom["examples_per_step"]["flag"] = "--p-examples"
    add_arguments(p, AlignerTrainConfig, (*laten, "modules"), **custom,
                  modules={"help": "transferred modules (default: up,down,v,o; without v_proj for GQA)"})
    add_arguments(p, LatenSettings, ("locate_batch",), locate_batch={
        "default": None, "help": f"examples per batched locate pass (E; default: the config's laten.locate_batch, "
                                 f"else {LatenSettings.locate_batch}; a config with laten.steps caps it at the "
                                 f"examples its seeds locate)"})
    p.add_argument("--chunk", type=int, default=512, help="neurons per attribution block (default: %(default)s)")
    p.set_defaults(func=_plan)


def _plan(args: argparse.Namespace) -> int:
    import dataclasses

    from pktjax.errors import ConfigError
    from pktjax.memory import PlanInput, check_input, mesh_sizes, plan, render, transfer_input
    from pktjax.presets import load_config

    models = [m for m in (args.teacher, args.student) if m]
    if (args.config is None and len(models) < 2) or (args.config is not None and models):
        raise ConfigError("plan needs either a transfer config or both --teacher and --student.")
    if args.config is not None:
        from pktjax.transfer.config import read_config

        cfg = read_config(args.config)
        device = cfg.device
        sizes = mesh_sizes(args.mesh or device.mesh or "fsdp=1", args.devices)
        gib = args.device_memory_gb or device.device_memory_gb or DEVICE_GIB
        inp = transfer_input(cfg, _spec_config(cfg.teacher), _spec_config(cfg.student), sizes, gib)
        names = (cfg.teacher, cfg.student)
    else:
        sizes = mesh_sizes(args.mesh or "fsdp=1", args.devices)
        inp = PlanInput(teacher=load_config(args.teacher), student=load_config(args.student), mesh=sizes,
                        device_gib=args.device_memory_gb or DEVICE_GIB)
        names = (args.teacher, args.student)
    given = {"dtype": args.dtype, "rate": args.rate, "p_examples": args.examples_per_step,
             "micro_batch": args.micro_batch, "cutoff_len": args.cutoff_len, "chunk": args.chunk,
             "modules": args.modules, "locate_batch": args.locate_batch}
    inp = dataclasses.replace(inp, **{k: v for k, v in given.items() if v is not None})
    check_input(inp)
    print(render(inp, plan(inp), names))
    return 0


def _spec_config(spec: str):
    """A transfer config's model spec as a :class:`pktjax.config.ModelConfig`, no weights read: what the job
    would load, or a preset name (``llama-2-13b``, ...) to plan a job whose weights are not here."""
    from pathlib import Path

    from pktjax.errors import ConfigError
    from pktjax.presets import load_config, preset_names
    from pktjax.transfer.models import peek_config

    if spec in preset_names() and not Path(spec).expanduser().exists():
        return load_config(spec)
    cfg = peek_config(spec)
    if cfg is None:
        raise ConfigError(f"model {spec!r} is a Hugging Face repo not downloaded yet: download it (a `pktjax "
                          "transfer` run does) or plan with --teacher/--student and its config.json.")
    return cfg
