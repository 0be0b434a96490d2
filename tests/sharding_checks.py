"""Multi-device checks of :mod:`pktjax.sharding`, run in a child process whose jax sees 8 CPU devices.

``python -m tests.sharding_checks CHECK [ARGS]``: each check asserts and exits non-zero on failure. The test
module sets ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` and ``JAX_PLATFORMS=cpu`` before starting it
(jax fixes its device count at import). Every sharded result is compared with the same computation on one device.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from pktjax import sharding as S
from pktjax.checkpoint import Model, SafetensorsSource, layer_shapes, load_model, save_model, top_shapes
from pktjax.memory import tree_bytes
from pktjax.data import IGNORE
from pktjax.model import forward
from pktjax.tiny import tiny_config

MESHES = {"8x1": "fsdp=8", "4x2": "fsdp=4,tensor=2", "2x2x2": "data=2,fsdp=2,tensor=2"}
TOL = 1e-5

# The rules, written out independently of pktjax.sharding.RULES: mesh axes of each parameter's dims.
EXPECTED = {
    "embed": ("tensor", "fsdp"), "lm_head": ("tensor", "fsdp"), "final_norm": (None,),
    "layers/q_proj": (None, "tensor", "fsdp"), "layers/k_proj": (None, "tensor", "fsdp"),
    "layers/v_proj": (None, "tensor", "fsdp"), "layers/gate_proj": (None, "tensor", "fsdp"),
    "layers/up_proj": (None, "tensor", "fsdp"), "layers/o_proj": (None, "fsdp", "tensor"),
    "layers/down_proj": (None, "fsdp", "tensor"), "layers/input_norm": (None, None),
    "layers/post_attn_norm": (None, None), "layers/q_bias": (None, None), "layers/k_bias": (None, None),
    "layers/v_bias": (None, None),
}


def teacher_cfg(**kw):
    """hidden 64, 8 heads (4 kv heads for qwen2), ffn 128, 3 layers: divisible by every axis of the meshes."""
    base = {"hidden": 64, "heads": 8, "inter": 128, "layers": 3}
    return tiny_config(**{**base, **kw})


def student_cfg(**kw):
    return tiny_config(**{"hidden": 32, "heads": 4, "inter": 64, "layers": 2, **kw})


def random_params(cfg, seed: int) -> dict:
    """Host (numpy) float32 parameters: norms near 1, matrices N(0, 0.2^2). numpy keeps setup free of compiles."""
    rng = np.random.default_rng(seed)

    def draw(name, shape):
        x = 1 + 0.1 * rng.standard_normal(shape) if name.endswith("norm") else 0.2 * rng.standard_normal(shape)
        return x.astype(np.float32)

    params = {k: draw(k, s) for k, s in top_shapes(cfg).items()}
    params["layers"] = {k: draw(k, (cfg.num_layers, *s)) for k, s in layer_shapes(cfg).items()}
    return params


def save_random(folder: Path, cfg, seed: int) -> Path:
    """A Hugging Face checkpoint folder of :func:`random_params` (float32 safetensors)."""
    return save_model(Model(params=random_params(cfg, seed), config=cfg), folder)


def close(got, want, what: str, tol: float = TOL) -> None:
    """``|got - want| <= tol * max(1, max|want|)`` elementwise (float32 work, tolerance 1e-5)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    err = float(np.max(np.abs(got - want))) if got.size else 0.0
    scale = max(1.0, float(np.max(np.abs(want)))) if want.size else 1.0
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol * scale:.3g}"


def tree_close(got, want, what: str, tol: float = TOL) -> None:
    paths = jax.tree_util.tree_flatten_with_path(want)[0]
    for (path, w), g in zip(paths, jax.tree.leaves(got)):
        close(g, w, f"{what}/{S.path_str(path)}", tol)


def tree_rel_close(got, want, what: str, tol: float = TOL) -> None:
    """Each leaf within ``tol`` of its own largest entry (for gradients far below 1)."""
    paths = jax.tree_util.tree_flatten_with_path(want)[0]
    for (path, w), g in zip(paths, jax.tree.leaves(got)):
        w, g = np.asarray(w, np.float64), np.asarray(g, np.float64)
        err, scale = float(np.max(np.abs(g - w))), float(np.max(np.abs(w)))
        assert err <= tol * max(scale, 1e-30), f"{what}/{S.path_str(path)}: error {err:.3g} vs max {scale:.3g}"


def expected_spec(path: str, shape, mesh_shape) -> P:
    """EXPECTED with a dim that its axis does not divide replicated."""
    axes = EXPECTED[path]
    return P(*[a if a is None or dim % mesh_shape[a] == 0 else None for a, dim in zip(axes, shape)])


def check_param_specs(params, mesh) -> None:
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = S.path_str(path)
        want = expected_spec(name, x.shape, mesh.shape)
        assert x.sharding.spec == want, f"{name}: spec {x.sharding.spec} != {want}"
        shard = tuple(d // (1 if a is None else mesh.shape[a]) for d, a in zip(x.shape, list(want) + [None] * 3))
        assert x.addressable_shards[0].data.shape == shard, (name, x.addressable_shards[0].data.shape, shard)


def batch(b: int = 8, t: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.RandomState(seed)
    ids = rng.randint(4, 260, size=(b, t)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1:2, :4] = 0  # left padding of the second row
    return ids, mask


# --------------------------------------------------------------------------------------------------- checks

def check_forward() -> None:
    """Logits on 8x1, 4x2, 2x2x2 (llama MHA, qwen2 GQA + biases + tied) and a non-divisible case."""
    check_mesh_errors()
    cases = [(teacher_cfg(), m) for m in MESHES.values()]
    cases.append((teacher_cfg(model_type="qwen2", kv_heads=4), MESHES["2x2x2"]))
    cases.append((teacher_cfg(inter=44), "tensor=8"))  # V=260 and f=44 are not divisible by 8: replicated dims
    for cfg, spec in cases:
        if cfg.model_type == "qwen2":
            cfg = cfg.__class__(**{**cfg.__dict__, "tie_word_embeddings": True})
        params = random_params(cfg, 1)
        ids, mask = batch(b=8 if spec != "tensor=8" else 3)
        ref = jax.jit(forward, static_argnums=1)(params, cfg, ids, mask)
        mesh = S.make_mesh(spec)
        sharded = S.shard(params, mesh)
        check_param_specs(sharded, mesh)
        held = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(sharded))
        assert held == tree_bytes(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params), mesh.shape)
        out = S.sharded_forward(cfg, mesh, sharded, ids.shape)(sharded, ids, mask)
        assert out.sharding.spec == S.batch_spec(out.shape, mesh.shape, last="tensor")
        close(out, ref, f"logits {cfg.model_type} {spec}")
    mesh = S.make_mesh("tensor=8")
    p = S.shard(random_params(teacher_cfg(inter=44), 1), mesh)
    assert p["embed"].sharding.spec == P(None, "fsdp") and p["layers"]["up_proj"].sharding.spec == P(None, None, "fsdp")
    print("forward ok")


def check_load(tmp: Path) -> None:
    """``load_params`` on a mesh equals ``load_model``, for float32 and bfloat16; slices only are requested."""
    cfg = teacher_cfg(model_type="qwen2", kv_heads=4)
    folder = save_random(tmp / "ckpt", cfg, 3)
    for dtype in (jnp.float32, jnp.bfloat16):
        want = load_model(folder, dtype=dtype)
        for spec in (MESHES["2x2x2"], MESHES["8x1"]):
            mesh = S.make_mesh(spec)
            got = S.load_params(want.config, SafetensorsSource(folder), dtype, mesh)
            check_param_specs(got, mesh)
            for (path, w), g in zip(jax.tree_util.tree_flatten_with_path(want.params)[0], jax.tree.leaves(got)):
                assert g.dtype == w.dtype, (S.path_str(path), g.dtype, w.dtype)
                np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
    _check_slices_only(cfg, folder)
    print("load ok")


class _Recording:
    """A tensor source with ``get_slice`` that records what was asked for (and refuses whole reads)."""

    def __init__(self, folder: Path):
        self.inner, self.path, self.asked = SafetensorsSource(folder), folder, []

    def names(self):
        return self.inner.names()

    def shape(self, name):
        return self.inner.shape(name)

    def get(self, name):
        raise AssertionError("a whole tensor was read")

    def get_slice(self, name, index):
        self.asked.append((name, index))
        return self.inner.get(name)[index]


def _check_slices_only(cfg, folder: Path) -> None:
    mesh = S.make_mesh(MESHES["8x1"])
    src = _Recording(folder)
    S.load_params(cfg, src, jnp.float32, mesh)
    up = [idx for name, idx in src.asked if name.endswith("layers.0.mlp.up_proj.weight")]
    assert len(up) == 8, up  # one distinct [f, d/8] slice per device, each read once
    assert all(i[1].stop - i[1].start == cfg.hidden_size // 8 for i in up), up


def check_orbax(tmp: Path) -> None:
    """Save on one mesh shape, restore on others (incl. one with non-divisible dims and one device)."""
    from pktjax.align import init_aligner
    from pktjax.train_aligner import OPTIMIZER

    cfg = teacher_cfg(inter=44)
    aligner = jax.tree.map(lambda x: x * 1e4, init_aligner(jax.random.key(0), ("up_proj", "o_proj"), 64, 32))
    tree = {"params": random_params(cfg, 2), "aligner": aligner, "opt": OPTIMIZER.init(aligner)}
    S.save_state(tmp / "state", S.shard(tree, S.make_mesh(MESHES["8x1"])))
    for spec, devices in ((MESHES["2x2x2"], None), ("tensor=8", None), ("fsdp=1", jax.devices()[:1])):
        mesh = S.make_mesh(spec, devices)
        got = S.restore_state(tmp / "state", tree, mesh)
        check_param_specs(got["params"], mesh)
        for path, x in jax.tree_util.tree_flatten_with_path(got)[0]:
            assert x.sharding.spec == S.spec_for(S.path_str(path), x.shape, mesh.shape), S.path_str(path)
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, tree)
    mesh = S.make_mesh(MESHES["2x2x2"])
    assert S.restore_state(tmp / "state", tree, mesh)["aligner"]["up_proj"]["w1"].sharding.spec == P("tensor", "fsdp")
    print("orbax ok")


def check_attribution() -> None:
    """All attribution scores of a sharded model equal the single-device ones; the vocabulary-parallel
    log-probability (explicit collectives) equals the plain one."""
    from pktjax.attribution import attribution

    cases = [(teacher_cfg(), "reference", "last_key", list(MESHES.values())),
             (teacher_cfg(model_type="qwen2", kv_heads=4), "rmsnorm", "all_keys", [MESHES["2x2x2"]])]
    for cfg, mode, attention, specs in cases:
        params = random_params(cfg, 4)
        ids = batch(b=1, t=10, seed=5)[0][0]
        want = attribution(params, cfg, ids, 77, mode=mode, attention=attention, chunk=48)
        for spec in specs:
            got = attribution(S.shard(params, S.make_mesh(spec)), cfg, ids, 77, mode=mode, attention=attention,
                              chunk=48)
            tree_close(got, want, f"attribution {cfg.model_type} {mode} {attention} {spec}")
    mesh = S.make_mesh(MESHES["4x2"])
    x = jax.random.normal(jax.random.key(0), (5, 64))
    w = S.shard({"lm_head": jax.random.normal(jax.random.key(1), (260, 64))}, mesh)["lm_head"]
    want = jax.nn.log_softmax(np.asarray(x, np.float64) @ np.asarray(w, np.float64).T, axis=1)[:, 201]
    close(S.vocab_log_prob(x, w, jnp.int32(201), mesh), want, "vocab_log_prob")
    print("attribution ok")


def seeded_selection(cfg, k: int, n_f: int, n_a: int, seed: int):
    """A selection of ``k`` layers and ``n_f`` / ``n_a`` neurons drawn from ``seed`` (locate is checked apart)."""
    from pktjax.select import Selection

    rng = np.random.default_rng(seed)
    layers = lambda: np.sort(rng.choice(cfg.num_layers, k, replace=False)).astype(np.int32)  # noqa: E731
    pick = lambda n, m: np.stack([rng.choice(n, m, replace=False) for _ in range(k)]).astype(np.int32)  # noqa: E731
    return Selection(attn_layers=layers(), ffn_layers=layers(), ffn_neurons=pick(cfg.intermediate_size, n_f),
                     attn_neurons=pick(cfg.q_dim, n_a))


def aligner_setup(modules=("up_proj", "down_proj", "v_proj", "o_proj")):
    """A teacher/student pair, an aligner with visible (not 1e-5) weights, seeded selections, the teacher's
    knowledge and a batch of 4 examples (host arrays)."""
    from pktjax.align import init_aligner
    from pktjax.extract import extract

    cfg_t, cfg_s = teacher_cfg(), student_cfg()
    teacher, student = random_params(cfg_t, 5), random_params(cfg_s, 6)
    aligner = jax.tree.map(lambda x: np.asarray(x) * 5e3, init_aligner(jax.random.key(7), modules, 64, 32))
    sel_t = seeded_selection(cfg_t, cfg_s.num_layers, 16, 8, 8)
    sel_s = seeded_selection(cfg_s, cfg_s.num_layers, 16, 8, 9)
    knowledge = jax.tree.map(np.asarray, extract(teacher, cfg_t, sel_t, modules))
    ids, mask = batch(b=4, t=12, seed=9)
    labels = np.where(mask > 0, ids, IGNORE).astype(np.int32)
    data = {"ids": ids, "mask": mask, "labels": labels, "weight": np.ones(4, np.float32)}
    return cfg_s, student, aligner, sel_s, knowledge, data, (teacher, cfg_t, sel_t)


def check_aligner() -> None:
    """One aligner step (loss, gradients, AdamW update) jitted with explicit shardings equals one device."""
    from pktjax.checkpoint import Model
    from pktjax.train_aligner import OPTIMIZER, aligner_loss, apply_update, step_gradients

    cfg_s, student, aligner, sel_s, knowledge, data, _ = aligner_setup()
    grad_fn = jax.value_and_grad(aligner_loss, has_aux=True)
    args = (aligner, student, cfg_s, sel_s, knowledge, data, jnp.float32(1000.0))
    (loss, (_, mse)), grads = jax.jit(grad_fn, static_argnums=2)(*args)
    opt = jax.tree.map(np.asarray, OPTIMIZER.init(aligner))
    grads = jax.tree.map(np.asarray, grads)
    new_a, new_opt = apply_update(aligner, opt, grads, jnp.float32(1e-3))
    for spec in MESHES.values():
        mesh = S.make_mesh(spec)
        sargs = (S.shard(aligner, mesh), S.shard(student, mesh), cfg_s, sel_s, S.shard(knowledge, mesh),
                 S.shard_batch(data, mesh), jnp.float32(1000.0))
        assert sargs[0]["up_proj"]["w2"].sharding.spec == S.spec_for("w2", (32, 64), mesh.shape)
        fn = S.sharded_jit(grad_fn, mesh, sargs, static_argnums=(2,), batch_argnums=(5,))
        (s_loss, (_, s_mse)), s_grads = fn(*sargs)
        close(s_loss, loss, f"loss {spec}")
        close(s_mse, mse, f"mse {spec}")
        tree_rel_close(s_grads, grads, f"grads {spec}")
        assert s_grads["o_proj"]["w1"].sharding.spec == S.spec_for("o_proj/w1", (64, 64), mesh.shape)
        upd_args = (sargs[0], S.shard(opt, mesh), S.shard(grads, mesh), jnp.float32(1e-3))
        upd = S.sharded_jit(apply_update, mesh, upd_args, donate_argnums=(0, 1))
        s_new_a, s_new_opt = upd(*upd_args)
        tree_close(s_new_a, new_a, f"updated aligner {spec}")
        tree_close(s_new_opt, new_opt, f"optimizer state {spec}")
        assert s_new_opt[0].mu["up_proj"]["w1"].sharding.spec == S.spec_for("w1", (64, 64), mesh.shape)
    # the trainer's own (propagation-sharded) gradient function on sharded inputs
    mesh = S.make_mesh(MESHES["2x2x2"])
    model = Model(params=S.shard(student, mesh), config=cfg_s)
    t_loss, _, _, t_grads = step_gradients(S.shard(aligner, mesh), model, sel_s, S.shard(knowledge, mesh),
                                           [S.shard_batch(data, mesh)], 1000.0)
    close(t_loss, loss, "step_gradients loss")
    tree_rel_close(t_grads, grads, "step_gradients grads")
    print("aligner ok")


def random_lora(cfg, rank: int, seed: int) -> dict:
    """A LoRA of every target with non-zero A and B (host arrays): layers ``a [L, r, in]``, ``b [L, out, r]``;
    ``embed`` ``a [r, V]``, ``b [d, r]``; ``lm_head`` ``a [r, d]``, ``b [V, r]``."""
    from pktjax.lora import TARGETS, set_factors, target_shape

    rng = np.random.default_rng(seed)
    lora: dict = {}
    for t in TARGETS:
        out, inp = target_shape(cfg, t)
        lead = (cfg.num_layers,) if t not in ("embed_tokens", "lm_head") else ()
        ab = {"a": 0.1 * rng.standard_normal((*lead, rank, inp)), "b": 0.1 * rng.standard_normal((*lead, out, rank))}
        lora = set_factors(lora, t, {k: v.astype(np.float32) for k, v in ab.items()})
    return lora


def lora_step_fns(cfg, tc, total: int):
    """``(grad_fn, update_fn)`` of one LoRA step from the trainer's pieces: the summed response-token loss with
    dropout (``lora_train.lora_objective``) and its gradient; the trainer's optimizer (clipping + AdamW) update."""
    import optax

    from pktjax.lora_train import lora_objective, optimizer
    from pktjax.model import LoraSpec

    def grad_fn(lora, base, data, rng):
        spec = LoraSpec(scale=tc.scale, dropout=tc.dropout, rng=rng)
        return jax.value_and_grad(lora_objective, has_aux=True)(lora, base, cfg, data, spec)

    def update_fn(lora, opt, grads):
        updates, opt = optimizer(tc, total).update(grads, opt, lora)
        return optax.apply_updates(lora, updates), opt

    return grad_fn, update_fn


def check_lora() -> None:
    """One LoRA step (loss and gradients with dropout, clipped AdamW update) jitted with explicit shardings equals
    one device on every mesh."""
    from pktjax.lora_train import TrainConfig, optimizer

    cfg = student_cfg()
    base, lora = random_params(cfg, 10), random_lora(cfg, 4, 11)
    tc = TrainConfig(rank=4, alpha=8.0, dropout=0.05, batch_size=4, micro_batch=4, epochs=1, bucket=16)
    ids, mask = batch(b=4, t=12, seed=12)
    data = (ids, mask, np.where(mask > 0, ids, IGNORE).astype(np.int32))
    rng = jax.random.key(3)
    grad_fn, update_fn = lora_step_fns(cfg, tc, 10)
    host = lambda t: jax.tree.map(np.asarray, t)  # noqa: E731  fresh host copies (the updates donate)
    opt0 = host(optimizer(tc, 10).init(lora))
    (loss, n), grads = host(jax.jit(grad_fn)(lora, base, data, rng))
    want = jax.jit(update_fn)(lora, opt0, grads)
    for spec in MESHES.values():
        mesh = S.make_mesh(spec)
        args = (S.shard(lora, mesh), S.shard(base, mesh), S.shard_batch(data, mesh), rng)
        assert args[0]["embed"]["a"].sharding.spec == S.spec_for("embed/a", (4, 260), mesh.shape)
        (s_loss, s_n), s_grads = S.sharded_jit(grad_fn, mesh, args, batch_argnums=(2,))(*args)
        close(s_loss, loss, f"lora loss {spec}")
        assert int(s_n) == int(n)
        tree_rel_close(s_grads, grads, f"lora grads {spec}")
        q_b = s_grads["layers"]["q_proj"]["b"]
        assert q_b.sharding.spec == S.spec_for("q_proj/b", q_b.shape, mesh.shape), q_b.sharding
        u_args = (S.shard(lora, mesh), S.shard(opt0, mesh), S.shard(grads, mesh))
        got = S.sharded_jit(update_fn, mesh, u_args, donate_argnums=(0, 1))(*u_args)
        tree_close(got, want, f"lora update {spec}")
    print("lora ok")


# ------------------------------------------------------------------------------------------- the trainers

def chat(i: int) -> dict:
    a, b = 3 + i, 11 + 2 * i
    return {"messages": [{"role": "user", "content": f"Q{i}: what is {a}+{b}?"},
                         {"role": "assistant", "content": f"The sum is {a + b}."}]}


def spy(module, name: str, seen: list, pick: Callable) -> None:
    """Wrap ``module.name`` so that each call appends ``pick(args, result)`` to ``seen``."""
    real = getattr(module, name)

    def wrapped(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(pick(args, out))
        return out

    setattr(module, name, wrapped)


def check_aligner_specs(tree, what: str) -> None:
    """Aligner-shaped trees on a mesh with tensor=2 and fsdp>=2: ``w1 [64, 64]`` on (tensor, fsdp), ``w2 [32, 64]``
    on (fsdp, tensor) (written out, independent of the rule table)."""
    for module, ws in tree.items():
        assert ws["w1"].sharding.spec == P("tensor", "fsdp"), (what, module, ws["w1"].sharding)
        assert ws["w2"].sharding.spec == P("fsdp", "tensor"), (what, module, ws["w2"].sharding)


def check_train_aligner(tmp: Path) -> None:
    """``train_aligner`` for 2 steps on 2x2x2 (checkpoints streamed into their shardings, aligner, gradients and
    knowledge laid out by the rules) and on 4x2 (interrupted after step 0, resumed on 2x2x2) saves the same aligner
    at every step as the run without a mesh; so does ``pktjax laten train --mesh``."""
    import importlib

    from pktjax.cli import main
    from pktjax.tiny import save_random_model
    from pktjax.train_aligner import TrainConfig, load_aligner, train_aligner

    ta = importlib.import_module("pktjax.train_aligner")
    teacher, student = save_random_model(tmp / "t", teacher_cfg(), 5), save_random_model(tmp / "s", student_cfg(), 6)
    extract, align = [chat(i) for i in range(3)], [chat(i) for i in range(10, 16)]
    cfg = TrainConfig(steps=2, examples_per_step=5, cutoff_len=48, micro_batch=4, bucket=16, lr=1e-3,
                      train_on_inputs=True)

    def run(out: str, **kw):
        return train_aligner(teacher, student, extract, align, tmp / out, cfg, progress=False, **kw)

    want = run("ref")
    pairs, steps = [], []
    spy(ta, "locate_pair", pairs, lambda a, out: (a[0], out[0]))
    spy(ta, "step_gradients", steps, lambda a, out: (a[0], out[3]))
    mesh = S.make_mesh(MESHES["2x2x2"])
    got = run("2x2x2", mesh=MESHES["2x2x2"])
    for pair, _ in pairs:
        check_param_specs(pair.teacher.params, mesh)
        check_param_specs(pair.student.params, mesh)
    for aligner, grads in steps:
        check_aligner_specs(aligner, "aligner in")
        check_aligner_specs(grads, "gradients")
    check_aligner_specs(got, "final aligner")
    tree_close(got, want, "aligner 2x2x2")

    def stop(step, metrics):
        raise KeyboardInterrupt

    try:
        run("4x2", mesh=MESHES["4x2"], callback=stop)
    except KeyboardInterrupt:
        pass
    resumed = run("4x2", mesh=MESHES["2x2x2"])
    tree_close(resumed, want, "aligner 4x2 then 2x2x2")
    for step in (0, 1):
        tree_close(load_aligner(tmp / "4x2", step), load_aligner(tmp / "ref", step), f"saved step {step} 4x2")
    args = ["laten", "train", "--teacher", str(teacher), "--student", str(student), "--task", "mmlu", "--steps", "2",
            "--lr", "1e-3", "--cutoff-len", "48", "--examples-per-step", "5", "--micro-batch", "4", "--bucket", "16",
            "--no-progress", "--out", str(tmp / "cli")]
    for name, rows in (("extract", extract), ("align", align)):
        (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        args += [f"--{name}", str(tmp / f"{name}.jsonl")]
    assert main([*args, "--mesh", MESHES["2x2x2"]]) == 0
    tree_close(load_aligner(tmp / "cli", 1), want, "pktjax laten train --mesh")
    print("train_aligner ok")


def check_lora_train(tmp: Path) -> None:
    """``lora_train.train`` (2 steps of 2 micro-batches, dropout on) on 2x2x2 (batches split over data x fsdp, the
    adapter laid out by the rules) and on 4x2 (interrupted after step 1, resumed on 2x2x2) ends with the same
    adapter as without a mesh."""
    from pktjax import lora_train as lt
    from pktjax.data import Tokenized

    cfg = student_cfg()
    base, lora = random_params(cfg, 10), random_lora(cfg, 4, 11)
    rng = np.random.default_rng(12)
    items = []
    for n in rng.integers(6, 20, size=16):
        ids = rng.integers(4, 260, size=n).astype(np.int32)
        items.append(Tokenized(ids, np.where(np.arange(n) < n // 2, IGNORE, ids).astype(np.int32)))
    tc = lt.TrainConfig(rank=4, alpha=8.0, lr=1e-3, epochs=1, batch_size=8, micro_batch=4, bucket=16, seed=0,
                        save_every=1)

    def run(out: str, **kw):
        return lt.train(base, cfg, lora, items, tmp / out, tc, pad_id=3, progress=False, **kw)

    want = run("ref")
    batches: list = []
    spy(lt, "_device_batch", batches, lambda a, out: out)
    got = run("2x2x2", mesh=MESHES["2x2x2"])
    assert len(batches) == 4 and all(x.sharding.spec == P(("data", "fsdp"), None) for b in batches for x in b)
    for t in ("q_proj", "up_proj"):
        assert got["layers"][t]["a"].sharding.spec == P(None, None, "fsdp"), got["layers"][t]["a"].sharding
        assert got["layers"][t]["b"].sharding.spec == P(None, "tensor", None), got["layers"][t]["b"].sharding
    assert got["layers"]["down_proj"]["a"].sharding.spec == P(None, None, "tensor")
    assert got["embed"]["a"].sharding.spec == P(None, "tensor")
    assert got["lm_head"]["b"].sharding.spec == P("tensor", None)
    tree_close(got, want, "lora 2x2x2")

    _resume_on_another_mesh(run, want, "lora")
    print("lora_train ok")


def check_semalign_fit(tmp: Path) -> None:
    """SemAlign's one-layer LoRA (2 steps, targets carried with the examples, dropout on) trained by
    ``lora_train.fit`` on 2x2x2, and on 4x2 interrupted after step 1 and resumed on 2x2x2, ends with the factors
    of the run without a mesh; the targets are split over data x fsdp with the rest of the batch."""
    from pktjax import lora_train as lt
    from pktjax import semalign as SA
    from pktjax.data import Tokenized

    cfg = student_cfg()
    base = random_params(cfg, 20)
    sc = SA.SemAlignConfig()
    init = SA.init_trainable(base, cfg, 1, sc, 4, 8.0, 0)
    rng = np.random.default_rng(21)
    items = []
    for n in rng.integers(6, 20, size=16):
        ids = rng.integers(4, 260, size=n).astype(np.int32)
        items.append(Tokenized(ids, np.where(np.arange(n) < n // 2, IGNORE, ids).astype(np.int32),
                               extra=rng.normal(size=(n, cfg.hidden_size)).astype(np.float32)))
    tc = lt.TrainConfig(rank=4, alpha=8.0, lr=1e-2, epochs=1, batch_size=8, micro_batch=4, bucket=16, seed=0,
                        save_every=1)

    def run(out: str, **kw):
        return lt.fit(init, base, cfg, items, tmp / out, tc, pad_id=3, objective=SA.Objective(1, "lora", "ffn"),
                      progress=False, **kw)

    want = run("ref")
    batches: list = []
    spy(lt, "_device_batch", batches, lambda a, out: out)
    got = run("2x2x2", mesh=MESHES["2x2x2"])
    assert len(batches) == 4 and all(len(b) == 4 for b in batches)
    assert all(b[3].sharding.spec == P(("data", "fsdp"), None, None) for b in batches)
    assert got["layers"]["up_proj"]["a"].sharding.spec == P(None, "fsdp")
    tree_close(got, want, "semalign 2x2x2")

    _resume_on_another_mesh(run, want, "semalign")
    print("semalign ok")


def check_mesh_errors() -> None:
    from pktjax.errors import ConfigError

    assert S.parse_mesh_spec(None, 8) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert S.parse_mesh_spec("data=2,fsdp=-1", 8) == {"data": 2, "fsdp": 4, "tensor": 1}
    for bad in ("data=3", "fsdp=4,tensor=4", "pipe=8", "fsdp=x", "fsdp=-1,tensor=-1", "fsdp=8,fsdp=1"):
        try:
            S.make_mesh(bad)
        except ConfigError as e:
            assert "mesh" in str(e)
        else:
            raise AssertionError(f"mesh {bad!r} was accepted on 8 devices")
    print("mesh ok")


# ---------------------------------------------------------------------------------------------- multi-process

def multiprocess_worker(port: int, pid: int, folder: str) -> None:
    """One of two processes (2 CPU devices each): load a sharded pair, take one aligner step on the global
    4-device mesh, save the state with orbax and restore it on another mesh shape; process 0 writes results."""
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                               initialization_timeout=60)
    from jax.experimental import multihost_utils

    assert jax.device_count() == 4 and jax.local_device_count() == 2, jax.devices()
    out = Path(folder)
    result = multiprocess_step(out, out / "state", "fsdp=2,tensor=2")
    mesh = S.make_mesh("data=2,fsdp=2")
    restored = S.restore_state(out / "state", result["state"], mesh)
    w1 = restored["aligner"]["up_proj"]["w1"]
    assert w1.sharding.spec == P("tensor", "fsdp") and not w1.is_fully_addressable, w1.sharding
    gathered = multihost_utils.process_allgather({"result": result, "restored": restored}, tiled=True)
    if S.is_main_process():
        write_flat(out / "multiprocess.npz", gathered)
        (out / "meta.json").write_text(json.dumps({"processes": jax.process_count(), "devices": jax.device_count()}))
    multihost_utils.sync_global_devices("done")


def write_flat(path: Path, tree) -> None:
    np.savez(path, **{S.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]})


def multiprocess_step(out: Path, state_dir: Path, spec: str) -> dict:
    """Load the teacher/student checkpoints of ``out`` on mesh ``spec``, locate in the student, extract from the
    teacher, take one aligner step (gradients and AdamW update jitted with explicit shardings) and save the new
    state with orbax. Returns loss, gradients and state."""
    from pktjax.align import init_aligner
    from pktjax.attribution import attribution
    from pktjax.extract import extract
    from pktjax.select import select
    from pktjax.train_aligner import OPTIMIZER, aligner_loss, apply_update

    mesh = S.make_mesh(spec)
    cfg_t, cfg_s = teacher_cfg(), student_cfg()
    teacher = S.load_params(cfg_t, SafetensorsSource(out / "teacher"), jnp.float32, mesh)
    student = S.load_params(cfg_s, SafetensorsSource(out / "student"), jnp.float32, mesh)
    sel_t = seeded_selection(cfg_t, cfg_s.num_layers, 16, 8, 8)
    sel_s = select(attribution(student, cfg_s, batch(b=1, t=10, seed=8)[0][0], 99), cfg_s.num_layers, 16, 8)
    knowledge = extract(teacher, cfg_t, sel_t, ("up_proj", "down_proj", "o_proj"))
    aligner = jax.tree.map(lambda x: np.asarray(x) * 5e3, init_aligner(jax.random.key(7), tuple(knowledge), 64, 32))
    ids, mask = batch(b=4, t=12, seed=9)
    data = {"ids": ids, "mask": mask, "labels": np.where(mask > 0, ids, IGNORE).astype(np.int32),
            "weight": np.ones(4, np.float32)}
    args = (S.shard(aligner, mesh), student, cfg_s, sel_s, knowledge, S.shard_batch(data, mesh), jnp.float32(1000.0))
    grad_fn = S.sharded_jit(jax.value_and_grad(aligner_loss, has_aux=True), mesh, args, static_argnums=(2,),
                            batch_argnums=(5,))
    (loss, _), grads = grad_fn(*args)
    opt = S.shard(jax.tree.map(np.asarray, OPTIMIZER.init(aligner)), mesh)
    upd_args = (args[0], opt, grads, jnp.float32(1e-3))
    new_a, new_opt = S.sharded_jit(apply_update, mesh, upd_args, donate_argnums=(0, 1))(*upd_args)
    state = {"aligner": new_a, "opt": new_opt}
    S.save_state(state_dir, state)
    return {"loss": loss, "grads": grads, "state": state}


def prepare_multiprocess(out: Path) -> None:
    """The teacher and student checkpoints the multi-process check loads."""
    save_random(out / "teacher", teacher_cfg(), 5)
    save_random(out / "student", student_cfg(), 6)


def _resume_on_another_mesh(run, want, label: str) -> None:
    """Stop a run on the 4x2 mesh after its first step, resume it on 2x2x2: the result must equal ``want``."""
    def stop(step, metrics):
        if step == 1:
            raise KeyboardInterrupt

    try:
        run("4x2", mesh=MESHES["4x2"], on_step=stop)
    except KeyboardInterrupt:
        pass
    tree_close(run("4x2", mesh=MESHES["2x2x2"]), want, f"{label} 4x2 then 2x2x2")


TRANSFER_MESHES = ("4x2", "2x2x2")


def check_transfer(config: Path, out: Path) -> None:
    """``pktjax transfer CONFIG --mesh M`` into ``out/<M>`` for the 4x2 and 2x2x2 meshes; the weights that the
    batched locate, every evaluation and the aligner's training receive carry the rules' shardings of that mesh
    (the test compares the scores with the one-device run). Then greedy decoding with the KV cache (GSM8K) of the
    student sharded on 2x2x2 writes the completions of the unsharded student."""
    from pktjax.cli import main
    from pktjax.evaluate import evaluate
    from pktjax.transfer import stages as st

    seen: list = []
    spy(st, "evaluate", seen, lambda a, out: ("evaluate", a[0].params))
    spy(st, "locate_each", seen, lambda a, out: ("locate", a[0]))
    spy(st, "prepare_pair", seen, lambda a, out: ("prepare_pair", out.teacher.params, out.student.params))
    for name in TRANSFER_MESHES:
        seen.clear()
        assert main(["transfer", str(config), "--out", str(out / name), "--mesh", MESHES[name]]) == 0
        mesh = S.make_mesh(MESHES[name])
        stages = [s[0] for s in seen]
        # the base models and the fused student (injected in memory into the student of the aligner's pair);
        # teacher and student located once each
        assert stages.count("evaluate") >= 3 and stages.count("locate") == 2 and "prepare_pair" in stages, stages
        for stage, *trees in seen:
            for params in trees:
                assert dict(jax.tree.leaves(params)[0].sharding.mesh.shape) == dict(mesh.shape), stage
                check_param_specs(params, mesh)
    from pktjax.checkpoint import load_model

    student = out / TRANSFER_MESHES[-1] / "models" / "student"
    decoded = [[r["output"] for r in evaluate(load_model(student, mesh=m), "gsm8k", limit=4, batch_size=4,
                                              max_new_tokens=12)["records"]]
               for m in (None, S.make_mesh(MESHES[TRANSFER_MESHES[-1]]))]
    assert decoded[0] == decoded[1] and any(decoded[0]), decoded
    print("transfer ok")


def main(argv: list[str]) -> None:
    name = argv[0]
    if name == "transfer":
        check_transfer(Path(argv[1]), Path(argv[2]))
        return
    if name == "worker":
        multiprocess_worker(int(argv[1]), int(argv[2]), argv[3])
        return
    if name == "reference":  # the multi-process step on one device of one process
        out = Path(argv[1])
        result = multiprocess_step(out, out / "ref-state", "fsdp=1")
        write_flat(out / "reference.npz", {"result": result})
        return
    checks = {"forward": check_forward, "attribution": check_attribution, "aligner": check_aligner,
              "lora": check_lora, "mesh": check_mesh_errors}
    if name in checks:
        checks[name]()
        return
    with tempfile.TemporaryDirectory() as tmp:
        {"load": check_load, "orbax": check_orbax, "train_aligner": check_train_aligner,
         "lora_train": check_lora_train, "semalign": check_semalign_fit}[name](Path(tmp))


if __name__ == "__main__":
    main(sys.argv[1:])
