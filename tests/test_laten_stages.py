"""LaTen's extract, align and inject stages on tiny models with hand-made selections, and the lr schedule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pktjax
from pktjax.data import Tokenized
from pktjax.errors import ConfigError, PairError
from pktjax.extract import check_pair, default_modules
from pktjax.inject import delta_adapter
from pktjax.select import Selection
from pktjax.train_aligner import lr_schedule, micro_batches

MODULES = ("up_proj", "down_proj", "v_proj", "o_proj")


@pytest.fixture(scope="module")
def teacher(tiny_dir):
    return pktjax.load_model(tiny_dir("llama2", seed=1, hidden=48, layers=3, inter=64))


@pytest.fixture(scope="module")
def student(tiny_dir):
    return pktjax.load_model(tiny_dir("llama2"))


def _selection(layers_ffn, layers_attn, n_f, n_a, f, q, seed) -> Selection:
    rng = np.random.default_rng(seed)
    pick = lambda n, size: np.stack([rng.permutation(size)[:n] for _ in layers_ffn])  # noqa: E731
    return Selection(attn_layers=jnp.asarray(layers_attn), ffn_layers=jnp.asarray(layers_ffn),
                     ffn_neurons=jnp.asarray(pick(n_f, f)), attn_neurons=jnp.asarray(pick(n_a, q)))


def _teacher_sel(t):
    return _selection([0, 2], [1, 2], 4, 3, t.config.intermediate_size, t.config.q_dim, 0)


def _student_sel(s):
    return _selection([0, 1], [0, 1], 4, 3, s.config.intermediate_size, s.config.q_dim, 1)


def test_extract_gathers_rows_and_columns(teacher):
    sel = _teacher_sel(teacher)
    know = pktjax.extract(teacher.params, teacher.config, sel, MODULES)
    lay = {k: np.asarray(v) for k, v in teacher.params["layers"].items()}
    d = teacher.config.hidden_size
    assert know["up_proj"].shape == (2, 4, d) and know["down_proj"].shape == (2, d, 4)
    assert know["v_proj"].shape == (2, 3, d) and know["o_proj"].shape == (2, d, 3)
    for k in range(2):
        lf, la = int(sel.ffn_layers[k]), int(sel.attn_layers[k])
        nf, na = np.asarray(sel.ffn_neurons[k]), np.asarray(sel.attn_neurons[k])
        np.testing.assert_array_equal(know["up_proj"][k], lay["up_proj"][lf][nf, :])
        np.testing.assert_array_equal(know["down_proj"][k], lay["down_proj"][lf][:, nf])
        np.testing.assert_array_equal(know["v_proj"][k], lay["v_proj"][la][na, :])
        np.testing.assert_array_equal(know["o_proj"][k], lay["o_proj"][la][:, na])


def test_modules_default_and_gqa_refusal(tiny_dir, teacher):
    gqa = pktjax.load_model(tiny_dir("llama3")).config
    assert default_modules(teacher.config) == MODULES
    assert default_modules(gqa) == ("up_proj", "down_proj", "o_proj")
    sel = _selection([0], [1], 2, 2, gqa.intermediate_size, gqa.q_dim, 0)
    with pytest.raises(ConfigError, match="v_proj"):
        pktjax.extract({"layers": {}}, gqa, sel, ("up_proj", "v_proj"))
    with pytest.raises(ConfigError, match="modules"):
        pktjax.extract(teacher.params, teacher.config, _teacher_sel(teacher), ("q_proj",))


def test_check_pair(teacher, student):
    check_pair(teacher.config, student.config)
    with pytest.raises(PairError, match="not larger"):
        check_pair(student.config, teacher.config)
    with pytest.raises(PairError, match="not larger"):
        check_pair(student.config, student.config)


def _deltas(student, sel, seed=0):
    d = student.config.hidden_size
    shapes = {"up_proj": (2, 4, d), "down_proj": (2, d, 4), "v_proj": (2, 3, d), "o_proj": (2, d, 3)}
    keys = jax.random.split(jax.random.PRNGKey(seed), len(shapes))
    return {m: jax.random.normal(k, s) for k, (m, s) in zip(keys, shapes.items())}


def test_inject_changes_only_selected_entries(student):
    sel = _student_sel(student)
    deltas = _deltas(student, sel)
    before = jax.tree.map(np.array, student.params)
    new = pktjax.inject(student.params, student.config, sel, deltas)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, student.params), before)  # base unchanged
    for name, w in new["layers"].items():
        changed = np.asarray(w) != before["layers"][name]
        want = np.zeros_like(changed)
        if name in MODULES:
            ffn = name in ("up_proj", "down_proj")
            layers = sel.ffn_layers if ffn else sel.attn_layers
            neurons = sel.ffn_neurons if ffn else sel.attn_neurons
            for k, l in enumerate(np.asarray(layers)):
                idx = np.asarray(neurons[k])
                if name in ("up_proj", "v_proj"):
                    want[l][idx, :] = True
                else:
                    want[l][:, idx] = True
        np.testing.assert_array_equal(changed, want, err_msg=name)
    for name in ("embed", "final_norm", "lm_head"):
        assert new[name] is student.params[name]


def test_delta_sizes_match_numpy(student):
    """RMS of each module's deltas and of the student entries they are added to, recomputed in float64 NumPy from
    the HF-orientation weights: rows of up/v, columns of down/o, at the selected layers and neurons."""
    from pktjax.inject import delta_sizes

    sel = _student_sel(student)
    scale = {"up_proj": 1e-3, "down_proj": 2e-2, "v_proj": 5e-4, "o_proj": 0.3}  # unequal: pooling is tested
    deltas = {m: d * scale[m] for m, d in _deltas(student, sel, seed=3).items()}
    got = delta_sizes(student.params, student.config, sel, deltas)
    assert set(got) == {*MODULES, "all"}
    d2 = w2 = count = 0.0
    for m in MODULES:
        w = np.asarray(student.params["layers"][m], np.float64)  # [L, out, in]
        ffn = m in ("up_proj", "down_proj")
        layers, neurons = (sel.ffn_layers, sel.ffn_neurons) if ffn else (sel.attn_layers, sel.attn_neurons)
        entries = []
        for k, layer in enumerate(np.asarray(layers)):
            for n in np.asarray(neurons[k]):
                entries.append(w[layer, n, :] if m in ("up_proj", "v_proj") else w[layer, :, n])
        entries = np.concatenate(entries)
        delta = np.asarray(deltas[m], np.float64).ravel()
        assert entries.size == delta.size
        rms, w_rms = np.sqrt(np.mean(delta ** 2)), np.sqrt(np.mean(entries ** 2))
        # float32 squares summed over ~10^3 entries: relative error a few 1e-7; 1e-5 leaves margin
        assert got[m]["rms"] == pytest.approx(rms, rel=1e-5), m
        assert got[m]["weight_rms"] == pytest.approx(w_rms, rel=1e-5), m
        assert got[m]["relative"] == pytest.approx(rms / w_rms, rel=2e-5), m
        d2, w2, count = d2 + np.sum(delta ** 2), w2 + np.sum(entries ** 2), count + delta.size
    assert got["all"]["rms"] == pytest.approx(np.sqrt(d2 / count), rel=1e-5)
    assert got["all"]["relative"] == pytest.approx(np.sqrt(d2 / w2), rel=2e-5)
    # the entries a delta lands on are the ones inject changes: their RMS is that of (fused - base) there
    fused = pktjax.inject(student.params, student.config, sel, deltas)
    diff = np.asarray(fused["layers"]["o_proj"], np.float64) - np.asarray(student.params["layers"]["o_proj"])
    assert np.sqrt(np.sum(diff ** 2) / deltas["o_proj"].size) == pytest.approx(got["o_proj"]["rms"], rel=1e-5)


@pytest.mark.parametrize("family", ["llama2", "qwen2"])
def test_delta_adapter_forward_equals_inject(tiny_dir, family):
    """Training's in-product injection gives inject's logits and gradients; K < L and different FFN/attention
    layers leave some layers without a delta (qwen2: biased v_proj, grouped KV heads, so up/down/o only)."""
    model = pktjax.load_model(tiny_dir(family, layers=3))
    cfg = model.config
    sel = _selection([2], [0], 5, 3, cfg.intermediate_size, cfg.q_dim, 2)
    modules = default_modules(cfg)
    shapes = {m: (1, 5, cfg.hidden_size) if m == "up_proj" else (1, cfg.hidden_size, 5) if m == "down_proj"
              else (1, 3, cfg.hidden_size) if m == "v_proj" else (1, cfg.hidden_size, 3) for m in modules}
    keys = jax.random.split(jax.random.PRNGKey(3), len(shapes))
    deltas = {m: 0.3 * jax.random.normal(k, s) for k, (m, s) in zip(keys, shapes.items())}
    ids = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (2, 7)))
    mask = jnp.asarray([[0, 0, 1, 1, 1, 1, 1], [1] * 7])

    def via_inject(d):
        return pktjax.forward(pktjax.inject(model.params, cfg, sel, d), cfg, ids, mask)

    def via_adapter(d):
        return pktjax.forward(model.params, cfg, ids, mask, adapter=delta_adapter(cfg, sel, d))

    want, got = via_inject(deltas), via_adapter(deltas)
    assert float(jnp.abs(want - pktjax.forward(model.params, cfg, ids, mask)).max()) > 1e-2  # the deltas matter
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    g_want = jax.grad(lambda d: jnp.sum(jnp.sin(via_inject(d))))(deltas)
    g_got = jax.jit(jax.grad(lambda d: jnp.sum(jnp.sin(via_adapter(d)))))(deltas)
    for m in modules:
        scale = float(np.abs(np.asarray(g_want[m])).max())
        np.testing.assert_allclose(np.asarray(g_got[m]), np.asarray(g_want[m]), rtol=0, atol=1e-5 * scale, err_msg=m)
    adapter = delta_adapter(cfg, sel, deltas).weights["layers"]
    assert adapter["up_proj"]["rows"].shape == (3, 5) and adapter["down_proj"]["delta"].shape == (3, cfg.hidden_size, 5)
    np.testing.assert_array_equal(np.asarray(adapter["up_proj"]["delta"][:2]), 0.0)  # layers 0, 1: no delta


def test_inject_of_minus_extract_zeroes_the_selection(student):
    sel = _student_sel(student)
    know = pktjax.extract(student.params, student.config, sel, MODULES)
    new = pktjax.inject(student.params, student.config, sel, jax.tree.map(jnp.negative, know))
    again = pktjax.extract(new, student.config, sel, MODULES)
    for m in MODULES:
        np.testing.assert_array_equal(np.asarray(again[m]), 0.0)


def test_inject_jit_equals_eager_and_is_differentiable(student):
    sel = _student_sel(student)
    deltas = _deltas(student, sel, 1)
    eager = pktjax.inject(student.params, student.config, sel, deltas)
    jitted = jax.jit(pktjax.inject, static_argnums=1)(student.params, student.config, sel, deltas)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), eager, jitted)

    def total(d):
        p = pktjax.inject(student.params, student.config, sel, d)
        return sum(jnp.sum(p["layers"][m]) for m in MODULES)

    grads = jax.grad(total)(deltas)
    for m in MODULES:
        np.testing.assert_array_equal(np.asarray(grads[m]), 1.0)


def test_align_init_shapes_jit_and_vmap(teacher, student):
    al = pktjax.init_aligner(jax.random.PRNGKey(0), MODULES, 48, 32)
    for m in MODULES:
        assert al[m]["w1"].shape == (48, 48) and al[m]["w2"].shape == (32, 48)
        assert al[m]["w1"].dtype == jnp.float32
        assert abs(float(jnp.std(al[m]["w1"])) - 1e-5) < 2e-6
    know = pktjax.extract(teacher.params, teacher.config, _teacher_sel(teacher), MODULES)
    out = pktjax.align(al, know)
    d = student.config.hidden_size
    assert out["up_proj"].shape == (2, 4, d) and out["down_proj"].shape == (2, d, 4)
    assert out["v_proj"].shape == (2, 3, d) and out["o_proj"].shape == (2, d, 3)
    for m in MODULES:
        x = np.asarray(out[m])
        assert x.dtype == np.float32 and np.any(x != 0)  # float32: a tiny but non-zero delta at init
        assert np.abs(x).max() < 1e-8 and abs(x.mean()) < 1e-9
    jitted = jax.jit(pktjax.align)(al, know)
    for m in MODULES:
        np.testing.assert_array_equal(np.asarray(jitted[m]), np.asarray(out[m]))
    # vmap over a batch of knowledge dicts, and over a batch of aligners. Batched and plain matmuls may sum in
    # another order (XLA picks the kernel per CPU), so they agree to float32 rounding only: each output is two
    # chained dot products of length d_T, whose forward error is at most 2 d_T eps (|W2| |W1| |x|) elementwise
    # (the standard gamma_n bound, relu being 1-Lipschitz); that bound is align() of the absolute values.
    def close(got, want, aligner, knowledge):
        scale = pktjax.align(jax.tree.map(jnp.abs, aligner), jax.tree.map(jnp.abs, knowledge))
        for m in MODULES:
            bound = 2 * 48 * np.finfo(np.float32).eps * np.asarray(scale[m], np.float64) * 1.01
            assert np.all(np.abs(np.asarray(got[m], np.float64) - np.asarray(want[m], np.float64)) <= bound), m

    batch = jax.tree.map(lambda x: jnp.stack([x, 2 * x]), know)
    vm = jax.vmap(pktjax.align, in_axes=(None, 0))(al, batch)
    twice_know = jax.tree.map(lambda x: 2 * x, know)
    close({m: vm[m][1] for m in MODULES}, pktjax.align(al, twice_know), al, twice_know)
    als = jax.tree.map(lambda x: jnp.stack([x, -x]), al)
    va = jax.vmap(pktjax.align, in_axes=(0, None))(als, know)
    close({m: va[m][0] for m in MODULES}, out, al, know)


def test_lr_schedule_is_the_authors_one_cycle_over_the_split():
    """The authors' ``OneCycleLR(total_steps=len(extract split), pct_start=0.1, final_div_factor=1)``, stepped once
    per aligner step, for the shipped split sizes (20: gsm, mmlu, humaneval; 32: mbpp) and a short one; checked
    against torch, against optax where the peak falls on a step, and against hand-computed values."""
    import math

    import optax
    import torch

    lr = 3e-4
    for total in (20, 32, 3):
        opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=lr)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.1,
                                                    final_div_factor=1, anneal_strategy="cos")
        ref = []
        for _ in range(total):
            ref.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        ours = [lr_schedule(lr, total)(s) for s in range(total)]
        np.testing.assert_allclose(ours, ref, rtol=1e-12)  # both in float64 Python arithmetic
    s20 = lr_schedule(lr, 20)
    assert s20(0) == pytest.approx(lr / 25, rel=1e-12) and s20(1) == pytest.approx(lr, rel=1e-12)
    assert s20(19) == pytest.approx(lr / 25, rel=1e-12)
    # after the peak at step 1: cosine from lr down to lr/25 over steps 1..19
    for s in (2, 7, 12):
        want = lr / 25 + (lr - lr / 25) / 2 * (1 + math.cos(math.pi * (s - 1) / 18))
        assert s20(s) == pytest.approx(want, rel=1e-12)
    # optax's one-cycle puts its peak on step int(0.1 * 19) = 1 too: the same 20 values (optax computes in float32)
    ox = optax.cosine_onecycle_schedule(19, lr, pct_start=0.1, div_factor=25.0, final_div_factor=1.0)
    np.testing.assert_allclose([s20(s) for s in range(20)], [float(ox(s)) for s in range(20)], rtol=1e-5)
    # 32 steps (mbpp): the peak at 0.1 * 32 - 1 = 2.2 lies between steps 2 and 3, so no step runs at lr itself;
    # step 2 is 2/2.2 of the way up, step 3 only 0.8/28.8 of the way down, so step 3 runs at the highest rate
    s32 = [lr_schedule(lr, 32)(s) for s in range(32)]
    assert s32[0] == pytest.approx(lr / 25, rel=1e-12) and max(s32) < lr and int(np.argmax(s32)) == 3
    assert s32[2] == pytest.approx(lr + (lr / 25 - lr) / 2 * (1 + math.cos(math.pi * 2 / 2.2)), rel=1e-12)
    with pytest.raises(ConfigError):
        lr_schedule(lr, 0)


def test_micro_batches_pad_and_weight():
    items = [Tokenized(np.arange(n, dtype=np.int32) + 4, np.arange(n, dtype=np.int32) + 4) for n in (5, 9, 3)]
    batches = micro_batches(items, 2, 2, 8, 48)
    assert [b["ids"].shape for b in batches] == [(2, 8), (2, 16)]
    np.testing.assert_array_equal(batches[1]["weight"], [1, 0])
    assert batches[0]["mask"][0].sum() == 3 and batches[0]["ids"][0, 0] == 2  # left padded with EOS
    capped = micro_batches(items, 4, 2, 64, 10)
    assert capped[0]["ids"].shape == (4, 10)
