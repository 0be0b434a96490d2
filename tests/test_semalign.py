"""SemAlign: semantic bases against the pseudo-inverse's definition, the pairing formulas on hand-checked cases,
recomposition, the loss against NumPy, the layer attribution against torch autograd on the same checkpoint,
training (loss goes down, kill-and-resume is bit-identical) and the command line."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import pktjax
from pktjax import semalign as SA
from pktjax.cli import main
from pktjax.data import IGNORE, Batch, Tokenized, tokenize_seeking
from pktjax.errors import ConfigError, PairError
from pktjax.lora_train import TrainConfig, evaluate, fit
from tests.tiny import torch_model

EPS32 = float(np.finfo(np.float32).eps)
WORDS = ["red", "green", "blue", "gold", "gray", "pink"]
EXAMPLES = [{"messages": [{"role": "user", "content": f"colour {i}?"},
                          {"role": "assistant", "content": f"{WORDS[i % 6]} {WORDS[(i * 5) % 6]}"}]}
            for i in range(12)]
TEACHER = dict(seed=1, hidden=48, layers=4, inter=64)


def _head(v=260, d=32, seed=0):
    return np.random.default_rng(seed).normal(size=(v, d)).astype(np.float32)


# ------------------------------------------------------------------------------------------------ bases

def test_pinv_satisfies_penrose_conditions_and_bases_reproduce_the_head():
    w = _head()
    wp = SA.head_pinv(w).astype(np.float64)
    w64 = w.astype(np.float64)
    # The only error left after float64 arithmetic is rounding W⁺ to float32: W⁺ + E with |E| <= eps/2 |W⁺|.
    # Each Penrose residual is then at most ‖W‖₂ ‖E‖_F (‖W‖₂ or ‖W⁺‖₂), i.e. relative to its right-hand side
    # at most (eps/2) · √d · κ(W) (κ = σ_max/σ_min); the factor 4 covers the float64 Gram solve (≤ 1e-13 here).
    kappa = np.linalg.cond(w64)
    tol = 4 * (EPS32 / 2) * math.sqrt(w.shape[1]) * kappa
    for lhs, rhs in [(w64 @ wp @ w64, w64), (wp @ w64 @ wp, wp), ((w64 @ wp).T, w64 @ wp), ((wp @ w64).T, wp @ w64)]:
        assert np.linalg.norm(lhs - rhs) <= tol * np.linalg.norm(rhs)
    np.testing.assert_allclose(wp, np.linalg.pinv(w64), atol=tol * np.abs(wp).max())  # NumPy's SVD route

    s = SA.semantic_bases(w).astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(s, axis=0), 1.0, atol=4 * EPS32)
    ws = w64 @ s  # logits of each basis vector read back through the head
    np.testing.assert_allclose(ws, (w64 @ wp) / np.linalg.norm(wp, axis=0), atol=tol * np.abs(ws).max())
    # a dominant diagonal: each token's basis vector reads back as that token, above every other token's logit
    off = np.abs(ws - np.diag(np.diag(ws)))
    assert (np.diag(ws) > off.max(axis=0)).all()


def test_pinv_of_a_rank_deficient_head_drops_the_null_directions():
    w = _head(v=64, d=8)
    w[:, 7] = w[:, 0]  # rank 7: one singular value is 0
    wp = SA.head_pinv(w).astype(np.float64)
    w64 = w.astype(np.float64)
    assert np.linalg.norm(w64 @ wp @ w64 - w64) < 1e-5 * np.linalg.norm(w64)
    np.testing.assert_allclose(wp, np.linalg.pinv(w64, rcond=1e-6), atol=1e-5 * np.abs(wp).max())


def test_shared_vocabulary_is_required():
    with pytest.raises(PairError, match="shared vocabulary"):
        SA.alignment_map(_head(v=260), _head(v=300))


# ------------------------------------------------------------------------------------------------ pairing

@pytest.mark.parametrize("critical, lt, ls, k, a, b, lam", [
    (4, 40, 32, 4, 5, 6, 0.0),      # ⌊1.25·3⌋ = 3 < 4 ≤ ⌊1.25·4⌋ = 5; u = 5
    (40, 40, 32, 32, 39, 40, 1.0),  # the last layer: u = 40, a = min(40, 39) = 39, λ = clip(1) = 1
    (10, 28, 24, 9, 10, 11, 0.5),   # ⌊7·8/6⌋ = 9 < 10 ≤ ⌊7·9/6⌋ = 10; u = 10.5
    (1, 28, 24, 1, 1, 2, 1 / 6),    # u = 7/6
    (2, 4, 2, 1, 2, 3, 0.0),        # ℓ^T = (2, 4); u = 2
    (3, 4, 2, 2, 3, 4, 1.0),        # u = 4, a = 3
])
def test_pairing_matches_the_formulas(critical, lt, ls, k, a, b, lam):
    p = SA.pair_layers(critical, lt, ls)
    assert (p.student_layer, p.a, p.b) == (k, a, b) and p.lam == pytest.approx(lam, abs=1e-15)
    assert p.schedule == tuple(max(1, math.floor(lt * j / ls)) for j in range(1, ls + 1))
    assert p.student_index == k - 1 and p.teacher_indices == (a - 1, b - 1)


def test_pairing_bad_input():
    assert SA.pair_layers(4, 40, 32, student_layer=10).student_layer == 10
    with pytest.raises(ConfigError, match="outside"):
        SA.pair_layers(41, 40, 32)
    with pytest.raises(PairError, match="at least 2"):
        SA.pair_layers(1, 1, 1)


# ------------------------------------------------------------------------------------------------ recompose, loss

def test_recompose_paper_and_dual_frames():
    wt, ws = _head(d=48, seed=1), _head(d=32, seed=2)
    h = jnp.asarray(np.random.default_rng(3).normal(size=(2, 5, 48)).astype(np.float32))
    st, ss = jnp.asarray(SA.semantic_bases(wt)), jnp.asarray(SA.semantic_bases(ws))
    literal = np.asarray(SA.recompose(h, st, ss))  # through the V cosines
    mapped = np.asarray(SA.apply_map(h, SA.alignment_map(wt, ws, "paper")))
    # both are sums of V = 260 products of unit-scale terms in float32: a few hundred eps of the largest value
    np.testing.assert_allclose(mapped, literal, atol=260 * EPS32 * np.abs(literal).max())

    m = SA.alignment_map(ws, ws, "dual")  # equal heads: the dual frame recomposes exactly
    np.testing.assert_allclose(m, np.eye(32), atol=1e-6)
    x = jnp.asarray(np.random.default_rng(4).normal(size=(7, 32)).astype(np.float32))
    np.testing.assert_allclose(np.asarray(SA.apply_map(x, m)), np.asarray(x / jnp.linalg.norm(x, axis=-1,
                                                                                              keepdims=True)),
                               atol=32 * EPS32)
    s = np.asarray(ss, np.float64)  # the paper's frame is not tight: S Sᵀ is not a multiple of I
    eig = np.linalg.eigvalsh(s @ s.T)
    assert eig.max() / eig.min() > 1.5


def test_loss_matches_numpy():
    rng = np.random.default_rng(0)
    h, tgt = rng.normal(size=(2, 6, 8)), rng.normal(size=(2, 6, 8))
    z = rng.normal(size=(2, 6, 11))
    labels = np.full((2, 6), IGNORE)
    labels[0, 3:] = [4, 5, 6]
    labels[1, 1:] = [1, 2, 3, 4, 10]
    got = float(SA.loss(*(jnp.asarray(x, jnp.float32) for x in (h, tgt, z)), jnp.asarray(labels)))
    terms = []
    for b in range(2):
        for t in range(5):
            if labels[b, t + 1] != IGNORE:
                cl = h[b, t] @ tgt[b, t] / np.linalg.norm(h[b, t]) / np.linalg.norm(tgt[b, t])
                co = z[b, t, labels[b, t + 1]] / np.linalg.norm(z[b, t])
                terms.append((1 - cl) + (1 - co))
    assert got == pytest.approx(np.mean(terms), abs=1e-6)  # float32 cosines of 8-11 terms: ~1e-7 each


# ------------------------------------------------------------------------------------------------ attribution

def test_layer_attribution_matches_torch_autograd(tiny_dir):
    folder = tiny_dir("llama2", **TEACHER)
    model, tok = pktjax.load_model(folder), pktjax.load_tokenizer(folder)
    items = [tokenize_seeking(tok, ex) for ex in EXAMPLES[:3]]
    batches = [Batch(t.ids[None], np.ones((1, len(t.ids)), np.int32), t.labels[None]) for t in items]
    ours = SA.layer_attribution(model.params, model.config, batches)

    tm = torch_model(folder)
    want = np.zeros(TEACHER["layers"])
    for t in items:
        outs = []
        hooks = [layer.register_forward_hook(lambda _m, _i, o: outs.append(o[0] if isinstance(o, tuple) else o))
                 for layer in tm.model.layers]
        logits = tm(torch.as_tensor(t.ids[None], dtype=torch.long)).logits[0]
        for hk in hooks:
            hk.remove()
        for o in outs:
            o.retain_grad()
        nxt = torch.as_tensor(t.labels[1:], dtype=torch.long)
        pos = nxt != IGNORE
        torch.nn.functional.cross_entropy(logits[:-1][pos], nxt[pos]).backward()
        for i, o in enumerate(outs):
            want[i] += float((o[0, :-1][pos] * o.grad[0, :-1][pos]).abs().sum().detach())
    # Each score sums |h·g| terms (no cancellation), so its relative error is that of one product: a float32
    # forward and backward through 4 layers in two libraries, a few hundred ulp (2^-24 · 10^3 ≈ 6e-5).
    np.testing.assert_allclose(ours, want, rtol=2e-4)
    assert SA.critical_layer(ours) == int(np.argmax(want)) + 1


# ------------------------------------------------------------------------------------------------ training

@pytest.fixture(scope="module")
def pair(tiny_dir):
    teacher, student = pktjax.load_model(tiny_dir("llama2", **TEACHER)), pktjax.load_model(tiny_dir("llama2"))
    tok = pktjax.load_tokenizer(tiny_dir("llama2"))
    items = [tokenize_seeking(tok, ex) for ex in EXAMPLES]
    pairing = SA.pair_layers(3, 4, 2)
    m = SA.alignment_map(SA.head_of(teacher.params), SA.head_of(student.params))
    targets = SA.teacher_targets(teacher.params, teacher.config, items, pairing, m, "ffn", pad_id=3, micro_batch=4,
                                 bucket=32)
    return student, [Tokenized(t.ids, t.labels, extra=x) for t, x in zip(items, targets)], pairing


TC = TrainConfig(rank=4, alpha=8, lr=1e-2, epochs=2, batch_size=8, micro_batch=4, bucket=32, seed=0)


def test_targets_do_not_depend_on_batching(pair, tiny_dir):
    student, items, pairing = pair
    teacher = pktjax.load_model(tiny_dir("llama2", **TEACHER))
    m = SA.alignment_map(SA.head_of(teacher.params), SA.head_of(student.params))
    one = SA.teacher_targets(teacher.params, teacher.config, [Tokenized(t.ids, t.labels) for t in items[:2]],
                             pairing, m, "ffn", pad_id=3, micro_batch=1, bucket=32)
    for x, t in zip(one, items):
        assert x.shape == (len(t.ids), 32)
        np.testing.assert_allclose(x, t.extra, atol=1e-5)  # another padding length: float32 rounding only


@pytest.mark.parametrize("mode", ["lora", "weights"])
def test_training_lowers_the_loss_and_resume_is_bit_identical(pair, tmp_path, mode):
    student, items, pairing = pair
    sc = SA.SemAlignConfig(mode=mode)
    k = pairing.student_index
    obj = SA.Objective(k, mode, "ffn")
    init = SA.init_trainable(student.params, student.config, k, sc, TC.rank, TC.alpha, TC.seed)
    kw = dict(pad_id=3, objective=obj, record={"mode": mode}, progress=False)
    ev = dict(scale=TC.scale, pad_id=3, micro_batch=4, bucket=32, objective=obj)
    before = evaluate(student.params, student.config, init, items, **ev)
    full = fit(init, student.params, student.config, items, tmp_path / "full", TC, **kw)
    after = evaluate(student.params, student.config, full, items, **ev)
    assert after < before - 0.01

    def crash(step, metrics):
        if step == 3:
            raise KeyboardInterrupt  # killed in epoch 2; the checkpoint after epoch 1 is step 2

    with pytest.raises(KeyboardInterrupt):
        fit(init, student.params, student.config, items, tmp_path / "resumed", TC, on_step=crash, **kw)
    resumed = fit(init, student.params, student.config, items, tmp_path / "resumed", TC, **kw)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), resumed, full)

    # only layer k changed
    merged = SA.merged_params(student.params, full, k, sc, TC.scale)
    for t in SA.DEFAULT_TARGETS:
        w0, w1 = np.asarray(student.params["layers"][t]), np.asarray(merged["layers"][t])
        assert not np.array_equal(w0[k], w1[k])
        np.testing.assert_array_equal(np.delete(w0, k, axis=0), np.delete(w1, k, axis=0))


def test_alignment_cka_rows(pair, tiny_dir, tmp_path):
    from pktjax.analysis import alignment_cka, linear_cka, module_outputs
    from pktjax.checkpoint import Model
    from pktjax.plots import plot_alignment_cka

    student, items, pairing = pair
    teacher = pktjax.load_model(tiny_dir("llama2", **TEACHER))
    probe = [t.ids for t in items[:3]]
    k = pairing.student_index
    scales = jnp.linspace(0.1, 2.0, 32)[:, None]  # per output unit: not an isotropic change, so CKA moves
    moved = {**student.params, "layers": {**student.params["layers"], "down_proj":
                                          student.params["layers"]["down_proj"].at[k].multiply(scales)}}
    after = Model(params=moved, config=student.config, source=None)
    curves = alignment_cka(teacher, student, after, probe, k, "down_proj", max_tokens=None)
    assert curves["before"].shape == (4,) and not np.allclose(curves["before"], curves["after"])
    # independently: every real token's down_proj output of student layer k and teacher layer 2
    ids = np.zeros((3, max(map(len, probe))), np.int32)
    mask = np.zeros_like(ids)
    for i, p in enumerate(probe):
        ids[i, ids.shape[1] - len(p):], mask[i, ids.shape[1] - len(p):] = p, 1
    real = mask.reshape(-1) > 0
    xs = np.asarray(module_outputs(student.params, student.config, ids, mask, ("down_proj",))["down_proj"])
    ys = np.asarray(module_outputs(teacher.params, teacher.config, ids, mask, ("down_proj",))["down_proj"])
    want = linear_cka(xs[k][real], ys[2][real])
    assert curves["before"][2] == pytest.approx(want, abs=1e-4)  # float32 centred co-moments of ~100 tokens
    assert all(p.is_file() for p in plot_alignment_cka(curves, tmp_path / "cka", k + 1, (pairing.a, pairing.b)))


# ------------------------------------------------------------------------------------------------ command line

def test_cli_trains_and_refuses_bad_input(tiny_dir, tmp_path, capsys, monkeypatch):
    data = tmp_path / "task.jsonl"
    data.write_text("".join(json.dumps(ex) + "\n" for ex in EXAMPLES[:8]))
    teacher, student = str(tiny_dir("llama2", **TEACHER)), str(tiny_dir("llama2"))
    common = ["semalign", "train", "--teacher", teacher, "--student", student, "--task", str(data), "--epochs", "1",
              "--batch-size", "4", "--micro-batch", "4", "--rank", "4", "--seed-samples", "3", "--no-progress"]
    out = tmp_path / "run"
    assert main([*common, "--out", str(out), "--cka", "3"]) == 0
    info = json.loads((out / "semalign.json").read_text())
    plan = json.loads((out / "plan.json").read_text())
    assert plan["critical"] == int(np.argmax(plan["scores"])) + 1 and plan["samples"] == 3
    assert info["student_layer"] == SA.pair_layers(plan["critical"], 4, 2).student_layer
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert (out / "alignment_cka.png").is_file() and len(info["alignment_cka"]["after"]) == 4
    assert main([*common, "--out", str(tmp_path / "w"), "--mode", "weights", "--layer", "1"]) == 0
    assert pktjax.load_model(tmp_path / "w" / "model").config.num_layers == 2

    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "x"), "--layer", "3"]) == 2
    assert "beyond the student's 2 layers" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "x"), "--batch-size", "6"]) == 2
    assert main([*common, "--out", str(tmp_path / "x"), "--targets", "attn"]) == 2
    other = tiny_dir("llama2", vocab=300)
    assert main([*common[:5], str(other), *common[6:], "--out", str(tmp_path / "x")]) == 2
    assert "shared vocabulary" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # every refusal came before any output

    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    # the finished run's folder with other settings: refused before any model loads, naming folder and setting
    monkeypatch.setattr(pktjax.checkpoint, "load_model", no_load)
    assert main([*common, "--out", str(out), "--epochs", "2", "--frame", "dual"]) == 2
    err = capsys.readouterr().err
    assert f"{out} holds a run with different settings" in err and "epochs 1 there, 2 now" in err and \
        "frame 'paper' there, 'dual' now" in err and "Traceback" not in err, err
