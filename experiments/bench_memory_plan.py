"""Per-device memory of each sharded LaTen stage, measured from XLA's compiled programs, against `pktjax plan`.

Each stage's step is lowered and compiled (never run) on a mesh of simulated CPU devices with the shardings the
job uses: locate (the batched attribution of ``E`` examples of ``cutoff_len`` tokens, teacher and student), the
aligner's micro-batch gradient (``aligner_loss`` through the student) and the AdamW update. The measured figure is
XLA's ``memory_analysis()`` of the compiled SPMD program, per device: arguments + outputs + temporaries - the
outputs aliased to donated arguments. The predicted figure is the sum of the plan's components that live in that
program (:func:`stage_predictions`). Sizes: ``tiny`` and ``tenth`` of ``experiments/bench_attribution.py`` (Llama
shapes, vocabulary 32000; ``tenth`` is ~1/10 of Llama-2 13B -> 7B in width with their layer counts).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python experiments/bench_memory_plan.py --size tiny tenth --mesh fsdp=8 fsdp=4,tensor=2 data=2,fsdp=2,tensor=2

``--stage 'locate (teacher)' 'locate (student)'`` measures only those stages (each takes seconds to compile at
``tenth``; the training steps take minutes). ``--locate-batch 1 4 8`` compiles the locate stages for passes of
``E`` = 1, 4 and 8 examples (the plan's ``locate_batch``; default 1).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.bench_attribution import SIZES, make_config  # noqa: E402
from pktjax import memory as M  # noqa: E402
from pktjax import sharding as S  # noqa: E402
from pktjax.attribution import DEFAULT_CHUNK, _attribution_batch_jit  # noqa: E402
from pktjax.extract import _extract_jit, check_modules  # noqa: E402
from pktjax.select import Selection, neuron_counts  # noqa: E402
from pktjax.train_aligner import aligner_loss, apply_update  # noqa: E402

RUNS = {  # cutoff_len, micro_batch (P does not change a step's memory)
    "tiny": (128, 8),
    "tenth": (768, 4),
}


def pair_configs(size: str):
    return tuple(make_config(*SIZES[size][name]) for name in ("teacher", "student"))


def _placed(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def compiled_bytes(lowered) -> int:
    """Per-device bytes of a compiled program: arguments + outputs + temporaries - donated aliases."""
    m = lowered.compile().memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def _selection(k: int, n_f: int, n_a: int) -> Selection:
    """Shapes of a selection of ``k`` layers with ``n_f`` / ``n_a`` neurons each."""
    i32 = jnp.int32
    return Selection(attn_layers=jax.ShapeDtypeStruct((k,), i32), ffn_layers=jax.ShapeDtypeStruct((k,), i32),
                     ffn_neurons=jax.ShapeDtypeStruct((k, n_f), i32), attn_neurons=jax.ShapeDtypeStruct((k, n_a), i32))


STAGES = ("locate (teacher)", "locate (student)", "train step (micro-batch gradient)", "AdamW update")


def measure(inp: M.PlanInput, mesh, stages: tuple[str, ...] = STAGES) -> dict[str, int]:
    """Measured per-device bytes of each of ``stages`` (compiled steps) on ``mesh`` (a :class:`jax.sharding.Mesh`)."""
    dtype = jnp.dtype(inp.dtype)
    rep = S.replicated(mesh)
    t, s = inp.teacher, inp.student
    out: dict[str, int] = {}
    for name, cfg in (("teacher", t), ("student", s)):
        if f"locate ({name})" not in stages:
            continue
        params = M.param_structs(cfg, dtype)
        params = _placed(params, S.param_shardings(params, mesh))
        i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=rep)  # noqa: E731
        layers = i32(cfg.num_layers)
        e = M.locate_examples(inp)
        lowered = _attribution_batch_jit.lower(params, cfg, i32(e, inp.cutoff_len), i32(e, inp.cutoff_len), i32(e),
                                               jax.ShapeDtypeStruct((), jnp.bool_, sharding=rep), layers, layers,
                                               rms=False, chunk=inp.chunk)
        out[f"locate ({name})"] = compiled_bytes(lowered)

    modules = check_modules(inp.modules, t, s)
    n_f, n_a = neuron_counts(s.intermediate_size, s.hidden_size, inp.rate)
    k = s.num_layers
    aligner, opt = M.aligner_structs(t.hidden_size, s.hidden_size, modules)
    student = M.param_structs(s, dtype)
    knowledge = jax.eval_shape(lambda p, sel: _extract_jit(p, sel, modules), M.param_structs(t, dtype),
                               _selection(k, n_f, n_a))
    b, tokens = inp.micro_batch, inp.cutoff_len
    batch = {"ids": jax.ShapeDtypeStruct((b, tokens), jnp.int32), "mask": jax.ShapeDtypeStruct((b, tokens), jnp.int32),
             "labels": jax.ShapeDtypeStruct((b, tokens), jnp.int32), "weight": jax.ShapeDtypeStruct((b,), jnp.float32)}
    sel_s = _selection(k, n_f, n_a)
    args = (aligner, student, s, sel_s, knowledge, batch, 1000.0, "products")
    if STAGES[2] in stages:
        grad = S.sharded_jit(jax.value_and_grad(aligner_loss, has_aux=True), mesh, args, static_argnums=(2, 7),
                             batch_argnums=(5,))
        out[STAGES[2]] = compiled_bytes(grad.jitted.lower(*args))  # the jit carries the shardings
    lr = jax.ShapeDtypeStruct((), jnp.float32)
    update = S.sharded_jit(apply_update, mesh, (aligner, opt, aligner, lr), donate_argnums=(0, 1))
    if STAGES[3] in stages:
        out[STAGES[3]] = compiled_bytes(update.jitted.lower(aligner, opt, aligner, lr))
    return out


def stage_predictions(inp: M.PlanInput) -> dict[str, int]:
    """The plan's components that live in each compiled step: the step's weights (its arguments) plus the
    phase's transient terms. A plan's peak adds the rest of the held state (the other model, the running gradient
    sum, AdamW) to the larger phase; a compiled step never holds those, so they are left out here."""
    r = M.plan(inp)
    held, loc, train = r["held"], r["locate"], r["train"]
    return {
        "locate (teacher)": held["teacher weights"] + loc["attribution (teacher)"],
        "locate (student)": held["student weights"] + loc["attribution (student)"],
        "train step (micro-batch gradient)": (held["student weights"] + held["aligner (float32)"]
                                              + held["aligner gradients x2"] // 2 + sum(train.values())),
        "AdamW update": held["aligner (float32)"] + held["aligner gradients x2"] // 2 + held["AdamW state"],
    }


def plan_input(size: str, mesh_sizes: Mapping[str, int], dtype: str = "float32",
               locate_batch: int = 1) -> M.PlanInput:
    teacher, student = pair_configs(size)
    cutoff, micro = RUNS[size]
    return M.PlanInput(teacher=teacher, student=student, mesh=dict(mesh_sizes), dtype=dtype, cutoff_len=cutoff,
                       micro_batch=micro, p_examples=micro, chunk=DEFAULT_CHUNK, locate_batch=locate_batch)


def compare(size: str, spec: str, dtype: str = "float32", stages: tuple[str, ...] = STAGES,
            locate_batch: int = 1) -> list[dict[str, Any]]:
    """Rows ``{size, mesh, stage, locate_batch, measured, predicted, ratio}`` for one size on the mesh ``spec``
    (``locate_batch``: the examples ``E`` of a locate pass)."""
    n = S.spec_devices(spec)
    mesh = S.make_mesh(spec, jax.devices()[:n])
    inp = plan_input(size, dict(mesh.shape), dtype, locate_batch)
    got, want = measure(inp, mesh, stages), stage_predictions(inp)
    return [{"size": size, "mesh": spec, "stage": k, "locate_batch": locate_batch, "measured": got[k],
             "predicted": want[k], "ratio": got[k] / want[k]} for k in got]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", nargs="+", default=["tiny", "tenth"], choices=sorted(RUNS))
    p.add_argument("--mesh", nargs="+", default=["fsdp=1", "fsdp=8", "fsdp=4,tensor=2", "data=2,fsdp=2,tensor=2"])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--stage", nargs="+", default=list(STAGES), choices=STAGES, metavar="STAGE",
                   help=f"stages to measure (default all): {', '.join(repr(s) for s in STAGES)}")
    p.add_argument("--locate-batch", nargs="+", type=int, default=[1], metavar="E",
                   help="examples E of each locate pass measured (default 1; the training steps do not depend on it "
                        "and are measured once, at the first)")
    a = p.parse_args(argv)
    print(f"jax {jax.__version__}, {len(jax.devices())} {jax.devices()[0].platform} devices, {a.dtype} weights")
    print("| size | mesh | stage | E | measured MiB | plan MiB | measured / plan |")
    print("|---|---|---|---:|---:|---:|---:|")
    worst = 0.0
    for size in a.size:
        for spec in a.mesh:
            for i, e in enumerate(a.locate_batch):
                stages = tuple(s for s in a.stage if i == 0 or s.startswith("locate"))
                for r in compare(size, spec, a.dtype, stages, e):
                    worst = max(worst, abs(r["ratio"] - 1))
                    locates = r["stage"].startswith("locate")
                    print(f"| {r['size']} | {r['mesh']} | {r['stage']} | {e if locates else '-'} | "
                          f"{r['measured'] / 2**20:.2f} | {r['predicted'] / 2**20:.2f} | {r['ratio']:.3f} |",
                          flush=True)
    print(f"largest gap: {worst:.1%}")


if __name__ == "__main__":
    main()
