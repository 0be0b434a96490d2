"""The memory model of LaTen (locate + aligner training): per-device bytes for a teacher/student pair on a mesh
(what ``pktjax plan`` prints, and what ``pktjax transfer`` checks a job against before it loads a model).

No weights are read: shapes come from the configs as ``jax.ShapeDtypeStruct`` trees and ``jax.eval_shape`` (the
aligner, its AdamW state, the attribution outputs), and the bytes each device holds from the partition rules of
:mod:`pktjax.sharding` (a dim its mesh axes do not divide is counted as replicated). Notation: ``s`` bytes per
weight element (``--dtype``), ``b`` examples per micro-batch, ``T`` tokens (``--cutoff-len``), ``L, d, f, H, q =
H*hd, kv`` of the student (training) or teacher (attribution), ``V`` vocabulary, ``t`` the size of the
``tensor`` axis, ``b'`` the rows of a micro-batch on one device (``b / (data x fsdp)`` when that divides ``b``; the
batch rule splits a micro-batch only over the axes that divide it), ``K = L_S`` selected layers, ``N = N_f`` or ``N_a``.
An activation dim made of heads counts ``/ t`` only when ``t`` divides the heads (``H`` for ``q`` and the
attention scores, ``kv heads`` for ``kv``): a head is never cut, so XLA keeps all heads on every device otherwise,
even where the weight's rows divide.

Held throughout: teacher and student weights (rules), aligner ``W1 [d_T, d_T]``, ``W2 [d_S, d_T]`` per module
(float32, rules), AdamW ``mu, nu`` (same), gradients x2 (the micro-batch gradient plus the running sum).

Locate phase (per model, the larger counts), one pass of ``E`` examples (:func:`locate_examples`:
``locate_batch``, or the examples located when fewer). Held through the pass: each example's captured trace
``L (4 d + f + 2 q) 4`` and scores ``L (f + q) 4``. Then the larger of the forward's buffers and the neuron
loops' (never live together: the loops' arrays are formed from the trace after the forward ends). Forward:
attention scores and probabilities of one layer ``2 E H T^2 4 / t`` plus one FSDP-gathered layer of weights x2
(when ``fsdp > 1``). Loops: ``(6 L + 1) E V 4 / t``, six ``[L, E, V]`` float32 arrays of the last position after
every layer's attention and FFN (only the last position is projected: the forward's ``[T, V]`` logits are never
formed): the two log-softmaxes, their copies in the layout the neuron loops read, and the two layer gains'
logits, which XLA keeps through the loops (it schedules the layer gains' ``logsumexp`` fallback after them: the
buffer assignment of the ``tenth`` locate on ``fsdp=8`` and on ``fsdp=4,tensor=2``), and the ``[E, V]`` rows of
the layer a block reads; plus one neuron block ``2 c V 4 / t`` (its logits and their exponentials, or on ``fsdp``
the partial products and their sum) plus ``c d 4``, which does not grow with ``E`` (the examples are scored one
at a time over it, a ``lax.map``), where ``c`` is the larger of the blocks the attribution actually cuts from the
FFN and the attention neurons, ``ceil(n / ceil(n / chunk))`` for ``n = f`` and ``n = q`` (``chunk`` only bounds
them; at 1/10 of Llama-2 13B, 462 FFN and 512 attention neurons). The weights a neuron block reads are sliced from
one layer, so a mesh that splits ``f`` over ``tensor`` gathers one layer's columns, not the whole stack
(:func:`pktjax.attribution._neuron_scores_batch`). Measured against XLA at ``E`` = 1, 4, 8: docs/scale.md.

Training step (one micro-batch, gradients through the student, no rematerialisation): knowledge ``K N d_T s``,
aligner hidden ``K N d_T 4``, deltas and their cotangents ``2 K N d_S 4`` and the same again padded to all ``L``
layers for the forward's delta adapter (``L = K`` by default; split like the knowledge; the student's weights are
not copied: the deltas enter inside the products); residuals saved for the backward pass
``L b' T [s (6 d + (2 q + 2 kv + 4 f) / t) + (H / t) T (4 + s)]`` (layer input, 2 norms, attention and FFN
outputs, residual; q and context, k, v; gate, up, silu(gate), their product; float32 attention probabilities
and their cast); logits ``c b' T V 4 / t`` with ``c = 4`` (the logits, their copy without the last position that
the next-token loss shifts out, the log-softmax and the cotangent) or ``c = 3`` when ``t > 1``
(:func:`logits_copies`); one FSDP-gathered layer of weights x2. The rows ``b'`` hold on meshes with ``fsdp``
because the model pins its activations to the batch layout inside a sharded step
(:func:`pktjax.partition.constrain_batch`); unpinned, XLA followed the weights' ``fsdp``-split input dim and kept
every row of the logits on each device.

Peak = held + max(locate, training step). It fits when the peak is at most 90% of the device memory (the rest
is XLA's workspace and fragmentation; on GPU set ``XLA_PYTHON_CLIENT_MEM_FRACTION=0.95``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from pktjax import sharding as S
from pktjax.align import init_aligner
from pktjax.attribution import attribution
from pktjax.checkpoint import layer_shapes, top_shapes
from pktjax.errors import ConfigError
from pktjax.extract import check_modules
from pktjax.pair import check_laten_pair
from pktjax.select import neuron_counts
from pktjax.settings import DEFAULT_DTYPE, AlignerTrainConfig, LatenSettings
from pktjax.train_aligner import OPTIMIZER

USABLE = 0.9
GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class PlanInput:
    """What a plan needs: two configs, a mesh shape and the run's sizes."""

    teacher: Any
    student: Any
    mesh: Mapping[str, int]
    dtype: str = DEFAULT_DTYPE
    device_gib: float = 80.0
    rate: float = AlignerTrainConfig.rate
    p_examples: int = AlignerTrainConfig.examples_per_step
    micro_batch: int = AlignerTrainConfig.micro_batch
    cutoff_len: int = AlignerTrainConfig.cutoff_len
    chunk: int = 512
    modules: tuple[str, ...] | None = None
    locate_batch: int = LatenSettings.locate_batch
    located: int | None = None


# ------------------------------------------------------------------------------------------------ shapes and bytes

def param_structs(cfg, dtype) -> dict[str, Any]:
    """``ShapeDtypeStruct`` tree of a model's parameters (layout of :mod:`pktjax.model`)."""


    tree: dict[str, Any] = {k: jax.ShapeDtypeStruct(s, dtype) for k, s in top_shapes(cfg).items()}
    tree["layers"] = {k: jax.ShapeDtypeStruct((cfg.num_layers, *s), dtype) for k, s in layer_shapes(cfg).items()}
    return tree


def tree_bytes(tree: Any, mesh: Mapping[str, int]) -> int:
    """Bytes one device holds of a tree of arrays / ShapeDtypeStructs laid out by the partition rules."""


    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return sum(S.per_device_bytes(x.shape, x.dtype, S.spec_for(S.path_str(p), x.shape, mesh), mesh)
               for p, x in leaves)


@functools.cache
def aligner_structs(d_teacher: int, d_student: int, modules: tuple[str, ...]) -> tuple[Any, Any]:
    """``(aligner, AdamW state)`` shapes from ``jax.eval_shape`` of their initialisers."""


    aligner = jax.eval_shape(lambda k: init_aligner(k, modules, d_teacher, d_student), jax.random.key(0))
    return aligner, jax.eval_shape(OPTIMIZER.init, aligner)


@functools.cache
def attribution_structs(cfg, dtype: str, tokens: int, chunk: int) -> Any:
    """Shapes of the attribution scores (``jax.eval_shape`` of :func:`pktjax.attribution.attribution`)."""


    ids = jax.ShapeDtypeStruct((1, tokens), jnp.int32)
    return jax.eval_shape(lambda p, i: attribution(p, cfg, i, 0, chunk=chunk), param_structs(cfg, dtype), ids)


def _split(n: int, parts: int) -> int:
    return -(-n // parts)


def _on_tensor(n: int, units: int, t: int) -> int:
    """Per-device size of an activation dim of ``n`` made of ``units`` (heads, or single units) when the
    ``tensor`` axis has ``t`` devices: ``n / t`` when ``t`` divides ``units``, else ``n`` (heads are never cut, so
    XLA keeps all of them on every device even where the weight's rows divide)."""
    return n // t if units % t == 0 else n


def logits_copies(t: int) -> int:
    """``[b', T, V / t]`` float32 buffers the training step holds: the logits, their shifted copy, the
    log-softmax and the cotangent; with the vocabulary split over ``tensor`` XLA holds one fewer (measured on every
    mesh of docs/scale.md: the cross-device max and sum of the log-softmax end the fusion at a different place)."""
    return 4 if t == 1 else 3


def gathered_layer(cfg, s: int, mesh: Mapping[str, int]) -> int:
    """Two FSDP-gathered copies of one layer's weights (split over ``tensor`` only); none without ``fsdp``."""

    if mesh["fsdp"] == 1:
        return 0
    return 2 * s * sum(_split(math.prod(shape), mesh["tensor"]) for shape in layer_shapes(cfg).values())


def block_size(n: int, chunk: int) -> int:
    """Neurons per block when ``n`` are scored at most ``chunk`` at a time (evenly sized blocks, as the attribution
    cuts them)."""
    return _split(n, _split(n, chunk))


def locate_bytes(cfg, dtype, inp: PlanInput) -> int:
    """Transient bytes per device of one attribution pass of ``E`` examples (:func:`locate_examples`; formula in
    the module docstring): the trace and the scores, held through the pass, plus the larger of the forward's
    buffers and the neuron loops' (the ``[L, E, V]`` arrays are formed from the trace after the forward ends)."""
    t, tokens, v, e = inp.mesh["tensor"], inp.cutoff_len, cfg.vocab_size, locate_examples(inp)
    scores = tree_bytes(attribution_structs(cfg, dtype, tokens, inp.chunk), {"data": 1, "fsdp": 1, "tensor": 1})
    c = max(block_size(cfg.intermediate_size, inp.chunk), block_size(cfg.q_dim, inp.chunk))  # the loops run apart
    heads = _on_tensor(cfg.num_heads, cfg.num_heads, t)
    trace = 4 * cfg.num_layers * (4 * cfg.hidden_size + cfg.intermediate_size + 2 * cfg.q_dim)
    forward = 4 * 2 * heads * tokens ** 2 * e + gathered_layer(cfg, _itemsize(dtype), inp.mesh)
    loop = 4 * (6 * cfg.num_layers + 1) * _split(v, t) * e + 4 * (2 * c * _split(v, t) + c * cfg.hidden_size)
    return e * (trace + scores) + max(forward, loop)


def locate_examples(inp: PlanInput) -> int:
    """``E``: examples in one locate pass, ``locate_batch`` or the examples located when fewer (``located``)."""
    return min(inp.locate_batch, inp.located) if inp.located else inp.locate_batch


def rows_per_device(rows: int, mesh: Mapping[str, int]) -> int:
    """Rows of a ``[B, ...]`` batch on one device, as the batch rule lays them out: ``data x fsdp`` when it divides
    ``B``, else the longest prefix of those axes that does (a micro-batch of 4 on ``fsdp=8`` is not split)."""
    return S.per_device_bytes((rows,), jnp.int8, S.batch_spec((rows,), mesh), mesh)


def activation_bytes(cfg, s: int, inp: PlanInput, micro_batch: int) -> int:
    """Residuals saved for the backward pass plus the logits of one micro-batch, per device."""
    t, tokens = inp.mesh["tensor"], inp.cutoff_len
    b = rows_per_device(micro_batch, inp.mesh)
    h = cfg.num_heads
    split = (2 * _on_tensor(cfg.q_dim, h, t) + 2 * _on_tensor(cfg.kv_dim, cfg.num_kv_heads, t)
             + 4 * _on_tensor(cfg.intermediate_size, cfg.intermediate_size, t))
    per_token = s * (6 * cfg.hidden_size + split) + _on_tensor(h, h, t) * tokens * (4 + s)
    return (int(cfg.num_layers * b * tokens * per_token)
            + logits_copies(t) * b * tokens * _split(cfg.vocab_size, t) * 4)


def knowledge_bytes(inp: PlanInput, modules: tuple[str, ...], s: int) -> int:
    """Knowledge (weight dtype), the aligner's hidden layer before and after relu (float32), deltas and their
    cotangents (float32), twice (``[K, N, d_S]`` from the aligner, ``[L, N, d_S]`` in the delta adapter), split by
    the rules."""


    n_f, n_a = neuron_counts(inp.student.intermediate_size, inp.student.hidden_size, inp.rate)
    k, d_t, d_s = inp.student.num_layers, inp.teacher.hidden_size, inp.student.hidden_size
    total = 0
    def rows(n: int, d: int, dtype) -> int:  # one module's [K, N, d] array, split like row knowledge
        return tree_bytes({"up_proj": jax.ShapeDtypeStruct((k, n, d), dtype)}, inp.mesh)

    for m in modules:
        n = n_f if m in ("up_proj", "down_proj") else n_a
        total += rows(n, d_t, jnp.bfloat16 if s == 2 else jnp.float32)
        total += 2 * rows(n, d_t, jnp.float32) + 4 * rows(n, d_s, jnp.float32)
    return total


def _itemsize(dtype) -> int:
    return jnp.dtype(dtype).itemsize


# ---------------------------------------------------------------------------------------------------- the plan

def plan(inp: PlanInput) -> dict[str, Any]:
    """Per-device bytes of every component, the phase peaks and whether it fits (see the module docstring)."""

    modules = check_modules(inp.modules, inp.teacher, inp.student)
    s = _itemsize(inp.dtype)
    aligner, opt = aligner_structs(inp.teacher.hidden_size, inp.student.hidden_size, modules)
    student = param_structs(inp.student, inp.dtype)
    held = {
        "teacher weights": tree_bytes(param_structs(inp.teacher, inp.dtype), inp.mesh),
        "student weights": tree_bytes(student, inp.mesh),
        "aligner (float32)": tree_bytes(aligner, inp.mesh),
        "aligner gradients x2": 2 * tree_bytes(aligner, inp.mesh),
        "AdamW state": tree_bytes(opt, inp.mesh),
    }
    locate = {"attribution (teacher)": locate_bytes(inp.teacher, inp.dtype, inp),
              "attribution (student)": locate_bytes(inp.student, inp.dtype, inp)}
    train = {
        "knowledge, hidden, deltas": knowledge_bytes(inp, modules, s),
        "activations (1 micro-batch)": activation_bytes(inp.student, s, inp, inp.micro_batch),
        "gathered layer": gathered_layer(inp.student, s, inp.mesh),
    }
    peak = sum(held.values()) + max(max(locate.values()), sum(train.values()))
    best = _largest_micro_batch(inp, held, locate, train, s)
    return {"modules": modules, "held": held, "locate": locate, "train": train, "peak": peak,
            "fits": peak <= USABLE * inp.device_gib * GIB, "largest_micro_batch": best}


def _largest_micro_batch(inp: PlanInput, held, locate, train, s: int) -> int:
    """The largest micro-batch (up to P) whose peak fits; 0 if none does."""
    budget = USABLE * inp.device_gib * GIB - sum(held.values())
    fixed = sum(v for k, v in train.items() if not k.startswith("activations"))
    best = 0
    for b in range(1, inp.p_examples + 1):
        if max(max(locate.values()), fixed + activation_bytes(inp.student, s, inp, b)) <= budget:
            best = b
    return best


def _gib(n: float) -> str:
    return f"{n / GIB:8.2f}"


def render(inp: PlanInput, result: dict[str, Any], names: tuple[str, str] = ("teacher", "student")) -> str:
    """The plan as a Markdown table plus a verdict."""

    mesh = mesh_str(inp.mesh)
    n_dev = math.prod(inp.mesh.values())
    n_f, n_a = neuron_counts(inp.student.intermediate_size, inp.student.hidden_size, inp.rate)
    devices = f"{n_dev} device{'s' if n_dev > 1 else ''}"
    head = (f"teacher {names[0]} -> student {names[1]}, {inp.dtype} weights, mesh {mesh} ({devices} x "
            f"{inp.device_gib:g} GiB)")
    sizes = (f"modules {', '.join(result['modules'])}; K={inp.student.num_layers} layers, N_f={n_f}, N_a={n_a}; "
             f"P={inp.p_examples} examples in micro-batches of {inp.micro_batch} x {inp.cutoff_len} tokens; "
             f"attribution chunk {inp.chunk}, locate passes of {locate_examples(inp)} example(s)")
    lines = [head, sizes, "", "| phase | component | GiB per device |", "|---|---|---:|"]
    for phase, part in (("held", result["held"]), ("locate", result["locate"]), ("train step", result["train"])):
        lines += [f"| {phase} | {name} | {_gib(v)} |" for name, v in part.items()]
    lines.append(f"| **peak** | held + max(locate, train step) | **{_gib(result['peak']).strip()}** |")
    lines += ["", _verdict(inp, result)]
    return "\n".join(lines)


def _verdict(inp: PlanInput, result: dict[str, Any]) -> str:
    usable = USABLE * inp.device_gib
    share = f"peak {result['peak'] / GIB:.1f} GiB of {usable:.1f} GiB usable ({USABLE:.0%} of {inp.device_gib:g})"
    best = result["largest_micro_batch"]
    rows = inp.mesh["data"] * inp.mesh["fsdp"]
    note = (f" Note: a micro-batch is split only over the mesh axes that divide it: one of {inp.micro_batch} is not "
            f"split over all data x fsdp = {rows} devices (use a multiple of {rows})." if inp.micro_batch % rows else "")
    if result["fits"]:
        return f"FITS: {share}; micro-batches of up to {best} fit.{note}"
    narrower = _narrower_dtype(inp)
    dtype = f"; it also fits with --dtype {narrower}" if narrower else ""
    smaller = _smaller_locate_batch(inp, result)
    if smaller:
        return f"DOES NOT FIT: {share}; it fits with --locate-batch {smaller}{dtype}.{note}"
    if best:
        return f"DOES NOT FIT: {share}; it fits with --micro-batch {best}{dtype}.{note}"
    others = [m for m in alternatives(inp) if plan(dataclasses.replace(inp, mesh=m))["fits"]]
    if others:
        hint = "; on the same devices it fits with --mesh " + " or --mesh ".join(mesh_str(m) for m in others) + dtype
    elif narrower:
        hint = f"; it fits with --dtype {narrower}"
    else:
        hint = ", even with --micro-batch 1, another mesh of these devices or bfloat16 weights: use more devices"
    return f"DOES NOT FIT: {share}{hint}.{note}"


def _smaller_locate_batch(inp: PlanInput, result: dict[str, Any]) -> int | None:
    """The largest of ``E/2, E/4, ..., 1`` examples per locate pass that fits, when locate sets the peak."""
    if max(result["locate"].values()) <= sum(result["train"].values()):
        return None
    e = locate_examples(inp) // 2
    while e >= 1:
        if plan(dataclasses.replace(inp, locate_batch=e))["fits"]:
            return e
        e //= 2
    return None


def _narrower_dtype(inp: PlanInput) -> str | None:
    """``bfloat16`` when the plan holds float32 weights and fits with bfloat16 ones (same micro-batch and mesh)."""
    if inp.dtype == "bfloat16" or not plan(dataclasses.replace(inp, dtype="bfloat16"))["fits"]:
        return None
    return "bfloat16"


def alternatives(inp: PlanInput) -> list[dict[str, int]]:
    """Other ``fsdp x tensor`` meshes of the same device count (``data`` kept), fewest tensor devices first."""
    n = inp.mesh["fsdp"] * inp.mesh["tensor"]
    out = [{"data": inp.mesh["data"], "fsdp": n // t, "tensor": t} for t in range(1, n + 1) if n % t == 0]
    return [m for m in out if m != dict(inp.mesh)]


def mesh_str(mesh: Mapping[str, int]) -> str:
    return ",".join(f"{a}={n}" for a, n in mesh.items() if n > 1) or "fsdp=1"



def mesh_sizes(spec: str, devices: int | None) -> dict[str, int]:
    """Axis sizes of ``spec`` for ``devices`` devices (default: the product of the sizes given)."""

    if devices is None:
        if "-1" in spec:
            raise ConfigError(f"mesh {spec!r} has a -1 axis: pass --devices N to plan for N devices.")
        devices = S.spec_devices(spec)
    return S.parse_mesh_spec(spec, devices)


def transfer_input(cfg, teacher, student, mesh: Mapping[str, int], device_gib: float) -> PlanInput:
    """The plan of a transfer config's LaTen job (:class:`pktjax.transfer.config.TransferConfig`): the models'
    configs ``teacher``/``student``, the job's weights dtype and ``laten`` sizes, on a mesh of sizes ``mesh``."""
    lt = cfg.laten
    # the job locates each seed's extract examples (one per step) and its fuse example: at most this many when
    # the steps are given (without them, the extract split, which the plan does not read)
    located = len(lt.seeds) * (lt.steps + 1) if lt.steps is not None and lt.seeds else None
    return PlanInput(teacher=teacher, student=student, mesh=dict(mesh), dtype=cfg.device.dtype,
                     device_gib=device_gib, rate=lt.rate, p_examples=lt.examples_per_step,
                     micro_batch=lt.micro_batch, cutoff_len=lt.cutoff_len, locate_batch=lt.locate_batch,
                     located=located)


def check_input(inp: PlanInput) -> None:
    check_laten_pair(inp.teacher, inp.student, rate=inp.rate, modules=inp.modules)
    for name in ("p_examples", "micro_batch", "cutoff_len", "chunk", "locate_batch"):
        if getattr(inp, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer.")
    if inp.device_gib <= 0:
        raise ConfigError("--device-memory-gb must be positive.")
