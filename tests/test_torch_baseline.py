"""The PyTorch baseline (experiments/torch_baseline) computes what pktjax computes, and the benchmark runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import pktjax
from experiments.bench import compare
from experiments.bench import pktjax_phase as jx
from experiments.torch_baseline import align as talign
from experiments.torch_baseline import lora as tlora
from experiments.torch_baseline.locate import Scores, attribution as torch_attribution
from experiments.torch_baseline.selection import Picked, extract as torch_extract, select as torch_select
from pktjax.align import init_aligner
from pktjax.attribution import attribution
from pktjax.data import IGNORE, Tokenized
from pktjax.extract import extract
from pktjax.lora_train import micro_batches as lora_micro_batches
from pktjax.select import Attribution, select
from pktjax.train_aligner import OPTIMIZER, micro_batches
from tests.tiny import VOCAB, torch_model

ROOT = Path(__file__).resolve().parents[1]
IDS = np.array([17, 90, 33, 200, 5, 61, 128, 77, 12, 250, 44, 9], np.int32)
TARGET = 101
MODULES = ("up_proj", "down_proj", "v_proj", "o_proj")


def _rel(ours, ref) -> float:
    return float(np.max(np.abs(np.asarray(ours) - np.asarray(ref))) / np.max(np.abs(np.asarray(ref))))


def _as_torch(sel) -> Picked:
    return Picked(**{k: torch.as_tensor(np.array(v), dtype=torch.long) for k, v in vars(sel).items()})


@pytest.fixture(scope="module")
def pair(tiny_dir):
    """A tiny multi-head teacher (3 layers, f 64) and student (2 layers, f 48), both frameworks."""
    t_dir, s_dir = tiny_dir("llama2", layers=3, inter=64), tiny_dir("llama2", seed=1)
    return {"t": (pktjax.load_model(t_dir), torch_model(t_dir)), "s": (pktjax.load_model(s_dir), torch_model(s_dir))}


@pytest.mark.parametrize("family,mode,attention", [("llama2", "reference", "last_key"),
                                                   ("qwen2", "rmsnorm", "all_keys")])
def test_attribution_scores_match(tiny_dir, family, mode, attention):
    folder = tiny_dir(family)
    model = pktjax.load_model(folder)
    ours = torch_attribution(torch_model(folder), torch.as_tensor(IDS), TARGET, mode, attention, chunk=16)
    ref = attribution(model.params, model.config, IDS, TARGET, mode, attention, chunk=16)
    for name in ("layer_attn", "layer_ffn", "ffn", "attn"):
        assert _rel(getattr(ours, name), getattr(ref, name)) <= 1e-4, name
    picked, sel = torch_select(ours, 2, 5, 4).as_dict(), vars(select(ref, 2, 5, 4))  # each from its own scores
    for k, v in sel.items():
        np.testing.assert_array_equal(picked[k].numpy(), np.asarray(v), err_msg=k)


def test_selection_identical_with_ties():
    rng = np.random.default_rng(0)
    ffn = rng.integers(0, 4, (4, 40)).astype(np.float32)  # many exact ties
    attn = rng.integers(0, 3, (4, 16)).astype(np.float32)
    layers = np.array([1.0, 3.0, 3.0, 1.0], np.float32)
    ref = select(Attribution(jnp.asarray(layers), jnp.asarray(layers[::-1].copy()), jnp.asarray(ffn),
                             jnp.asarray(attn)), 2, 7, 5)
    ours = torch_select(Scores(*(torch.as_tensor(x) for x in (layers, layers[::-1].copy(), ffn, attn))), 2, 7, 5)
    for k, v in vars(ref).items():
        np.testing.assert_array_equal(ours.as_dict()[k].numpy(), np.asarray(v), err_msg=k)
    np.testing.assert_array_equal(ours.attn_layers.numpy(), [1, 2])  # ties to the lower index


def test_selection_agreement_counts_swapped_slots():
    layers = np.array([0, 2])
    ref = {"ffn_layers": layers, "ffn_neurons": np.array([[5, 1, 7], [2, 3, 4]]),
           "attn_layers": layers, "attn_neurons": np.array([[0, 1], [2, 3]])}
    ours = dict(ref, ffn_neurons=np.array([[5, 7, 1], [2, 3, 4]]))  # near-equal scores 1 and 7 swapped
    out = compare.selection_agreement(ours, ref)
    assert not out["identical"] and out["ffn_neuron_overlap"] == 1.0
    assert out["ffn_slots_differ"] == 2 and out["attn_slots_differ"] == 0
    other = dict(ref, attn_layers=np.array([0, 3]))
    out = compare.selection_agreement(other, ref)
    assert out["attn_layer_overlap"] == 0.5 and "attn_slots_differ" not in out


def _located(pair):
    """pktjax's selections (K = L_S, N_f = 4, N_a = 3) and the teacher's knowledge."""
    sels = [select(attribution(m.params, m.config, IDS, TARGET), 2, 4, 3) for m, _ in (pair["t"], pair["s"])]
    return sels, extract(pair["t"][0].params, pair["t"][0].config, sels[0], MODULES)


def test_extract_matches(pair):
    (sel_t, _), knowledge = _located(pair)
    ours = torch_extract(pair["t"][1], _as_torch(sel_t), MODULES)
    for m in MODULES:
        np.testing.assert_array_equal(ours[m].numpy(), np.asarray(knowledge[m]))


def _items(seed: int, n: int) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(4, VOCAB, int(rng.integers(6, 13))).astype(np.int32)
        labels = ids.copy()
        labels[:3] = IGNORE
        out.append(Tokenized(ids, labels))
    return out


def _tensors(batch: dict) -> dict:
    return {k: torch.as_tensor(np.asarray(v), dtype=torch.float32 if k == "weight" else torch.long)
            for k, v in batch.items()}


def _tiny_update_gap(new_ours, new_ref, before) -> bool:
    """Two optimizer results from one gradient agree to float32 rounding of ``p + update``."""
    before = np.asarray(before)
    gap = np.max(np.abs(np.asarray(new_ours) - np.asarray(new_ref)))
    update = np.max(np.abs(np.asarray(new_ref) - before))
    return gap <= 1e-6 * update + 4 * np.spacing(np.float32(np.max(np.abs(before))))


def _torch_aligner(aligner):
    out = talign.make_aligner(MODULES, 32, 32)
    with torch.no_grad():
        for m, p in aligner.items():
            out[m].w1.copy_(torch.as_tensor(np.array(p["w1"])))
            out[m].w2.copy_(torch.as_tensor(np.array(p["w2"])))
    return out


@pytest.mark.parametrize("injection", ["products", "weights"])
def test_aligner_step_matches(pair, injection):
    """Both ways to inject (deltas inside the products, or written into new weights) in both frameworks."""
    (_, sel_s), knowledge = _located(pair)
    batches = micro_batches(_items(0, 6), 4, 2, 8, 16)  # 6 examples: the second micro-batch has filler rows
    aligner = init_aligner(jax.random.key(0), MODULES, 32, 32)
    step = jx.aligner_step if injection == "products" else jx.aligner_step_weights
    loss, new, grads = step(aligner, pair["s"][0], sel_s, knowledge, batches, OPTIMIZER.init(aligner))
    ours = _torch_aligner(aligner)
    student = pair["s"][1].requires_grad_(False)
    t_loss = talign.aligner_step(ours, talign.make_optimizer(ours, jx.ALIGNER_LR), student, _as_torch(sel_s),
                                 {m: torch.as_tensor(np.array(k)) for m, k in knowledge.items()},
                                 [_tensors(b) for b in batches], injection=injection)
    assert not any(p.grad is not None for p in student.parameters())  # the student stays frozen
    assert abs(float(t_loss) - float(loss)) <= 1e-5 * abs(float(loss))
    for m in MODULES:
        for w in ("w1", "w2"):
            h = getattr(ours[m], w)
            assert _rel(h.grad.numpy(), grads[m][w]) <= 1e-5, (m, w)
            assert np.max(np.abs(h.detach().numpy() - np.asarray(new[m][w]))) <= 1e-5, (m, w)
    # the optimizers alone: AdamW(0.9, 0.95, wd 0.05) on pktjax's gradient gives pktjax's update
    same = _torch_aligner(aligner)
    for m in MODULES:
        for w in ("w1", "w2"):
            getattr(same[m], w).grad = torch.as_tensor(np.array(grads[m][w]))
    talign.make_optimizer(same, jx.ALIGNER_LR).step()
    for m in MODULES:
        for w in ("w1", "w2"):
            assert _tiny_update_gap(getattr(same[m], w).detach().numpy(), new[m][w], aligner[m][w]), (m, w)


def test_lora_step_matches(pair):
    model, tmodel = pair["s"]
    rng = np.random.default_rng(1)
    init = {t: {"a": rng.uniform(-0.2, 0.2, (2, 16, i)).astype(np.float32),
                "b": (0.01 * rng.standard_normal((2, o, 16))).astype(np.float32)}
            for t, (o, i) in {"q_proj": (32, 32), "o_proj": (32, 32), "up_proj": (48, 32),
                              "down_proj": (32, 48)}.items()}
    batches = [{"ids": b.ids, "mask": b.mask, "labels": b.labels}
               for b in lora_micro_batches(_items(2, 8), range(8), 4, 2, 8)]
    tx, update, scale = jx.lora_optimizer()
    lora = {"layers": jax.tree.map(jnp.asarray, init)}
    jb = [tuple(jnp.asarray(b[k]) for k in ("ids", "mask", "labels")) for b in batches]
    loss, new, acc = jx.lora_step(model, lora, jb, update, tx.init(lora), scale=scale, dropout=0.0)
    peft_model = tlora.wrap(tmodel, 16, 16.0, 0.0, tuple(init))
    tlora.set_factors(peft_model, init)
    t_loss = tlora.lora_step(peft_model, tlora.make_optimizer(peft_model, jx.LORA_LR), [_tensors(b) for b in batches])
    numpy = lambda tree: jax.tree.map(lambda x: x.numpy(), tree)  # noqa: E731
    ours = {"loss": float(t_loss), "params": numpy(tlora.get_factors(peft_model, tuple(init))),
            "grads": numpy(tlora.get_factors(peft_model, tuple(init), grad=True))}
    ref = {"loss": float(loss), "params": jax.tree.map(np.asarray, new["layers"]),
           "grads": jax.tree.map(np.asarray, jx.clipped_gradient(acc))}
    agree = compare.step_agreement(ours, ref, init)
    assert agree["loss_rel_diff"] <= 1e-5 and agree["grad_max_rel_diff"] <= 1e-5, agree
    assert agree["update_max_abs_diff"] <= 2 * jx.LORA_LR, agree  # Adam's first step is about lr * sign(g)
    # the optimizers alone: clipping + AdamW(0.9, 0.999) on pktjax's gradient gives pktjax's update
    tlora.set_factors(peft_model, init)
    tlora.set_factors(peft_model, jax.tree.map(np.asarray, jx.clipped_gradient(acc, None)), grad=True)
    opt = tlora.make_optimizer(peft_model, jx.LORA_LR)
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
    opt.step()
    after = numpy(tlora.get_factors(peft_model, tuple(init)))
    for t in init:
        for k in ("a", "b"):
            assert _tiny_update_gap(after[t][k], new["layers"][t][k], init[t][k]), (t, k)


REQUIRED = ("pktjax_s", "torch_s", "ratio", "pktjax_peak_mb", "torch_peak_mb")


def test_bench_runs_end_to_end(tmp_path):
    out = tmp_path / "tiny.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "experiments.bench", "--size", "tiny", "--reps", "1", "--out", str(out),
           "--markdown", str(tmp_path / "RESULTS.md")]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, timeout=600, capture_output=True)
    rec = json.loads(out.read_text())
    stages = rec["stages"]
    assert set(stages) == {"attribution_teacher", "attribution_student", "select", "extract", "aligner_step",
                           "aligner_step_weights", "lora_step"}
    for name, entry in stages.items():
        assert all(k in entry for k in REQUIRED), name
        assert entry["ratio"] == pytest.approx(entry["torch_s"] / entry["pktjax_s"])
    for name in ("attribution_teacher", "attribution_student"):
        entry = stages[name]
        assert entry["matmul_floor_s"] > 0 and entry["torch_matmul_floor_s"] > 0
        assert 0 <= entry["scores_max_rel_diff"] < 1e-2 and "pktjax_vs_float64_max_rel" in entry
    assert isinstance(stages["select"]["selection_identical"], bool)
    assert stages["extract"]["knowledge_max_abs_diff"] == 0.0
    assert stages["aligner_step"]["update_max_abs_diff"] <= 1e-5
    assert stages["aligner_step_weights"]["update_max_abs_diff"] <= 1e-5
    assert stages["lora_step"]["grad_max_rel_diff"] <= 1e-5
    assert "| attribution_teacher |" in (tmp_path / "RESULTS.md").read_text()
