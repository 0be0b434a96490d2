"""``pktjax plan``: per-device memory from shapes and partition rules, checked against hand-computed sizes."""

from __future__ import annotations

import json

import pytest

from pktjax.cli import main
from pktjax import memory as P
from pktjax.errors import ConfigError, PairError
from pktjax.presets import load_config, preset_names

GIB = 1 << 30


def _inp(mesh="fsdp=1", gib=80.0, dtype="bfloat16", **kw):
    """The documented Llama-2 13B -> 7B plans (bfloat16 weights unless ``dtype`` says otherwise)."""
    sizes = P.mesh_sizes(mesh, None)
    return P.PlanInput(teacher=load_config("llama-2-13b"), student=load_config("llama-2-7b"), mesh=sizes,
                       device_gib=gib, dtype=dtype, **kw)


def test_presets_are_the_published_shapes():
    assert {"llama-2-13b", "llama-2-7b", "qwen2.5-1.5b", "qwen2.5-0.5b"} <= set(preset_names())
    l13, q05 = load_config("llama-2-13b"), load_config("qwen2.5-0.5b")
    assert (l13.hidden_size, l13.intermediate_size, l13.num_layers, l13.num_heads) == (5120, 13824, 40, 40)
    assert (q05.hidden_size, q05.num_kv_heads, q05.vocab_size, q05.tie_word_embeddings) == (896, 2, 151936, True)
    with pytest.raises(ConfigError, match="neither a config.json"):
        load_config("llama-9-1t")


def test_weights_and_aligner_bytes_by_hand():
    r = P.plan(_inp())
    assert r["modules"] == ("up_proj", "down_proj", "v_proj", "o_proj")  # both models use multi-head attention
    assert r["held"]["teacher weights"] == 13_015_864_320 * 2  # Llama-2-13B parameters in bfloat16
    assert r["held"]["student weights"] == 6_738_415_616 * 2
    per_module = 5120 * 5120 + 4096 * 5120  # W1 [d_T, d_T] + W2 [d_S, d_T]
    assert r["held"]["aligner (float32)"] == 4 * per_module * 4
    assert r["held"]["AdamW state"] == 2 * r["held"]["aligner (float32)"] + 4  # mu, nu and the int32 count
    # N_f = 1100, N_a = 409 over K = L = 32 layers: knowledge [K, N, d_T] in bf16, the aligner's hidden layer
    # before and after relu (f32), the deltas [K, N, d_S], the adapter's [L, N, d_S] and both cotangents (f32)
    n = 2 * 1100 + 2 * 409
    assert r["train"]["knowledge, hidden, deltas"] == 32 * n * (5120 * 2 + 2 * 5120 * 4 + 4 * 4096 * 4)
    assert "injected student modules" not in r["train"]  # the deltas enter inside the products


def test_fsdp_divides_weights_and_batch_and_tensor_divides_heads():
    one, four = P.plan(_inp()), P.plan(_inp("fsdp=4", 32))
    norms = (2 * 40 + 1) * 5120 * 2  # two norms per layer and the final one stay replicated
    assert four["held"]["teacher weights"] == (one["held"]["teacher weights"] - norms) / 4 + norms
    acts = P.activation_bytes
    inp1, inp4 = _inp(), _inp("fsdp=4", 32)
    assert acts(inp4.student, 2, inp4, 4) * 4 == pytest.approx(acts(inp1.student, 2, inp1, 4), rel=1e-9)
    tp = _inp("fsdp=4,tensor=2", 16)
    assert acts(tp.student, 2, tp, 4) < acts(_inp("fsdp=8", 16).student, 2, _inp("fsdp=8", 16), 4)


def test_verdicts_for_the_documented_setups():
    gpu = P.plan(_inp())  # one 80 GiB GPU: micro-batches of 4 x 768 tokens are too many, 2 fit
    assert not gpu["fits"] and gpu["largest_micro_batch"] == 2
    assert P.plan(_inp("fsdp=4", 32))["fits"]  # TPU v4-8: 4 chips x 32 GiB
    v5e = _inp("fsdp=8", 16)  # TPU v5e-8: 8 chips x 16 GiB; fsdp alone does not fit, with tensor=2 it does
    assert not P.plan(v5e)["fits"] and P.plan(_inp("fsdp=4,tensor=2", 16))["fits"]
    assert "--mesh fsdp=4,tensor=2" in P._verdict(v5e, P.plan(v5e))


def test_cli_prints_a_table(capsys, tmp_path):
    cfg = {**load_config("qwen2.5-0.5b").to_hf_dict()}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert main(["plan", "--teacher", "qwen2.5-1.5b", "--student", str(tmp_path / "config.json"), "--mesh",
                 "data=2,fsdp=2", "--device-memory-gb", "16"]) == 0
    out = capsys.readouterr().out
    assert "| held | teacher weights |" in out and "mesh data=2,fsdp=2 (4 devices x 16 GiB)" in out
    assert "FITS" in out and "modules up_proj, down_proj, o_proj" in out  # GQA: v_proj left out


def test_cli_errors(capsys):
    assert main(["plan", "--teacher", "llama-2-7b", "--student", "llama-2-13b"]) == 2
    assert "not larger" in capsys.readouterr().err
    assert main(["plan", "--teacher", "llama-2-13b", "--student", "llama-2-7b", "--mesh", "fsdp=-1"]) == 2
    assert "--devices" in capsys.readouterr().err
    with pytest.raises(PairError):
        P.check_input(P.PlanInput(teacher=load_config("qwen2.5-1.5b"), student=load_config("llama-2-7b"),
                             mesh={"data": 1, "fsdp": 1, "tensor": 1}))
