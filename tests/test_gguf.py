"""GGUF files written with the ``gguf`` package, the way llama.cpp's converter lays them out, load to the numbers
of their source checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.quants import dequantize, quantize
from safetensors import safe_open

import pktjax
from pktjax.checkpoint import iter_hf_tensors
from tests.tiny import VOCAB, build_tokenizer, torch_model

ARCH = {"llama2": "llama", "llama3": "llama", "mistral": "llama", "qwen2": "qwen2"}
_BLOCK = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}


def _gguf_name(hf: str) -> str:
    if hf in _TOP:
        return _TOP[hf]
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}.{_BLOCK[rest]}"


def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row order: per head, the two rotary halves interleaved. ``w: [n_heads * hd, ...]``."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _encode(w: np.ndarray, qtype: Q) -> tuple[np.ndarray, Q]:
    """Norms and biases stay F32; a matrix whose rows do not fill 32-wide blocks falls back to F16."""
    if w.ndim == 1 or qtype == Q.F32:
        return w.astype(np.float32), Q.F32
    if qtype == Q.Q8_0 and w.shape[-1] % 32:
        return w.astype(np.float16), Q.F16
    return quantize(w.astype(np.float32), qtype), qtype


def _llama3_rope_factors(hf: dict) -> np.ndarray:
    """Per-frequency divisors of llama3 RoPE scaling, as llama.cpp stores them in ``rope_freqs``."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = LlamaConfig(**hf)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    base = 1.0 / cfg.rope_parameters["rope_theta"] ** (torch.arange(0, cfg.head_dim, 2).double() / cfg.head_dim)
    return (base / scaled.double()).float().numpy()


def _add_metadata(w: GGUFWriter, arch: str, hf: dict, family: str, vocab: int) -> None:
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    rope = hf.get("rope_parameters") or {}
    w.add_name(f"tiny-{family}")
    w.add_context_length(hf["max_position_embeddings"])
    w.add_embedding_length(hidden)
    w.add_block_count(hf["num_hidden_layers"])
    w.add_feed_forward_length(hf["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(hf["num_key_value_heads"])
    w.add_rope_dimension_count(hidden // heads)
    w.add_rope_freq_base(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    w.add_vocab_size(vocab)
    if family == "mistral":
        w.add_sliding_window(hf["sliding_window"])


def _add_tokenizer(w: GGUFWriter, folder: Path) -> None:
    """The byte-level test vocabulary as a ``gpt2`` tokenizer (scores stand in for the merges it lacks)."""
    vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3] * 4 + [1] * (len(tokens) - 4))  # 3 = control
    w.add_token_scores([0.0] * len(tokens))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(3)


def write_gguf(folder: Path, out: Path, family: str, qtype: Q) -> dict[str, np.ndarray]:
    """Convert a tiny checkpoint to GGUF as llama.cpp does; returns the weights (HF names and row order) that
    the file decodes to, i.e. the source after ``qtype``'s rounding."""
    hf = json.loads((folder / "config.json").read_text())
    arch = ARCH[family]
    w = GGUFWriter(out, arch)
    _add_metadata(w, arch, hf, family, VOCAB)
    _add_tokenizer(w, folder)
    decoded = {}
    with safe_open(folder / "model.safetensors", framework="numpy") as f:
        for name in f.keys():
            data = f.get_tensor(name)
            heads = {"q_proj": hf["num_attention_heads"], "k_proj": hf["num_key_value_heads"]}
            stored = data
            for key, n in heads.items():
                if arch == "llama" and f".{key}." in name:
                    stored = _permute(data, n)
            raw, kind = _encode(stored, qtype)
            w.add_tensor(_gguf_name(name), raw, raw_dtype=kind if kind not in (Q.F32, Q.F16) else None)
            back = dequantize(raw, kind).reshape(data.shape)
            decoded[name] = _permute_back(back, name, hf) if arch == "llama" else back
    if family == "llama3":
        w.add_tensor("rope_freqs.weight", _llama3_rope_factors(hf))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return decoded


def _permute_back(w: np.ndarray, name: str, hf: dict) -> np.ndarray:
    for key, n in (("q_proj", hf["num_attention_heads"]), ("k_proj", hf["num_key_value_heads"])):
        if f".{key}." in name:
            half = w.shape[0] // n // 2
            return w.reshape(n, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    return w


def _batch(t=9):
    ids = np.random.RandomState(3).randint(4, VOCAB, size=(2, t))
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    return ids, mask


_forward = jax.jit(pktjax.forward, static_argnums=1)


def _pktjax_logits(model, ids, mask):
    return np.asarray(_forward(model.params, model.config, jnp.asarray(ids), jnp.asarray(mask)))


def _torch_logits(folder: Path, ids, mask, weights: dict[str, np.ndarray] | None = None):
    ref = torch_model(folder)
    if weights is not None:
        ref.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}, strict=False)
    pos = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        return ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                   position_ids=torch.tensor(pos)).logits.numpy()


@pytest.fixture(scope="module")
def gguf_file(tiny_dir, tmp_path_factory):
    """``gguf_file(family, qtype) -> (source folder, .gguf path, decoded weights)``, cached."""
    cache: dict = {}

    def make(family: str, qtype: Q = Q.F32):
        if (family, qtype) not in cache:
            folder = tiny_dir(family, inter=64) if qtype != Q.F32 else tiny_dir(family)
            out = tmp_path_factory.mktemp(f"gguf-{family}") / f"tiny-{family}-{qtype.name}.gguf"
            cache[family, qtype] = folder, out, write_gguf(folder, out, family, qtype)
        return cache[family, qtype]

    return make


@pytest.mark.parametrize("family", ["llama2", "llama3", "qwen2", "mistral"])
def test_f32_gguf_matches_source(gguf_file, family):
    folder, path, _ = gguf_file(family)
    model = pktjax.load_model(path)
    src = pktjax.load_model(folder)
    ref = dict(iter_hf_tensors(src.params, src.config))
    for name, arr in iter_hf_tensors(model.params, model.config):  # q/k rows back in Hugging Face order
        np.testing.assert_array_equal(arr, ref[name], err_msg=name)
    ids, mask = _batch()
    diff = np.abs(_pktjax_logits(model, ids, mask) - _torch_logits(folder, ids, mask))
    assert diff[mask.astype(bool)].max() <= 1e-5


def test_config_from_metadata_equals_source(gguf_file):
    for family in ("llama2", "llama3", "qwen2", "mistral"):
        folder, path, _ = gguf_file(family)
        got, want = pktjax.load_model(path).config, pktjax.load_model(folder).config
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                      "head_dim", "rms_norm_eps", "rope_theta", "tie_word_embeddings", "attention_bias",
                      "sliding_window", "max_position_embeddings", "bos_token_id", "eos_token_id"):
            assert getattr(got, field) == getattr(want, field), (family, field)
        assert got.model_type == {"qwen2": "qwen2", "mistral": "mistral"}.get(family, "llama")
        # llama3 scaling comes back from the rope_freqs tensor: same frequencies, maybe other parameters
        np.testing.assert_allclose(got.inv_freq(), want.inv_freq(), rtol=1e-6)
        assert (got.rope.get("rope_type"), family == "llama3") in ((None, False), ("llama3", True))


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_q8_0_gguf_decodes_exactly_and_stays_close(gguf_file, family):
    """Q8_0 stores an int8 per weight and one f16 scale ``max|block| / 127`` per 32 weights, so each weight moves
    by at most half a step: for Gaussian weights (block maximum ~2 sigma) an error of ~0.5% of sigma RMS.

    Strict check: pktjax decodes exactly what was written (its weights equal gguf's own dequantization) and its
    logits match transformers run on those same rounded weights to 1e-4.
    Loose check against the unrounded source: ~14 rounded matrices compound to a few percent of the logits'
    RMS (1.5-3% measured on these models); 6% leaves room, while any layout error (a wrong q/k order, a
    transposed matrix) moves the logits by O(100%)."""
    folder, path, decoded = gguf_file(family, Q.Q8_0)
    model = pktjax.load_model(path)
    for name, arr in iter_hf_tensors(model.params, model.config):
        np.testing.assert_array_equal(arr, decoded[name], err_msg=name)
    ids, mask = _batch()
    ours = _pktjax_logits(model, ids, mask)
    valid = mask.astype(bool)
    rounded = _torch_logits(folder, ids, mask, decoded)
    assert np.abs(ours - rounded)[valid].max() <= 1e-4
    exact = _torch_logits(folder, ids, mask)[valid]
    rel_rms = np.sqrt(np.mean((ours[valid] - exact) ** 2) / np.mean(exact ** 2))
    assert 0 < rel_rms <= 0.06


def test_gguf_loads_in_bfloat16(gguf_file):
    folder, path, _ = gguf_file("qwen2", Q.Q8_0)
    model = pktjax.load_model(path, dtype=jnp.bfloat16)
    assert model.params["layers"]["q_proj"].dtype == jnp.bfloat16
    assert model.config.torch_dtype == "bfloat16"


def test_writer_matches_transformers_gguf_reader(gguf_file):
    """The test writer's q/k permutation is the one transformers' own GGUF loader undoes (so it is llama.cpp's)."""
    from transformers import AutoModelForCausalLM

    folder, path, _ = gguf_file("llama2")
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    src = torch_model(folder).state_dict()
    for name, value in ref.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), src[name].numpy(), err_msg=name)


def test_tokenizer_from_gguf(gguf_file):
    _, path, _ = gguf_file("qwen2")
    tok = pktjax.load_tokenizer(path)
    text = "Hello, wörld!\n<|user|>"
    assert tok(text)["input_ids"] == build_tokenizer()(text)["input_ids"]
    assert tok.eos_token == "</s>" and tok.eos_token_id == 2
    assert tok.decode(tok(text)["input_ids"]) == text


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_save_gguf_model_as_hf_checkpoint(gguf_file, tmp_path, family):
    folder, path, _ = gguf_file(family)
    out = pktjax.save_model(pktjax.load_model(path), tmp_path / "from-gguf")
    ids, mask = _batch()
    diff = np.abs(_torch_logits(out, ids, mask) - _torch_logits(folder, ids, mask))
    assert diff[mask.astype(bool)].max() <= 1e-5
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()


def test_chunked_threaded_dequantization_is_exact(gguf_file, monkeypatch):
    from pktjax import gguf_io

    monkeypatch.setattr(gguf_io, "_CHUNK_ROWS", 7)  # the 260-row embedding goes in 38 chunks over threads
    _, path, decoded = gguf_file("qwen2", Q.Q8_0)
    model = pktjax.load_model(path, cache_gguf=False)  # dequantize now, not read a cached copy
    np.testing.assert_array_equal(np.asarray(model.params["embed"]), decoded["model.embed_tokens.weight"])


@pytest.mark.parametrize("factor", [8.0, 32.0])
def test_real_llama3_rope_freqs_give_the_standard_parameters(factor):
    """Llama-3.1 (factor 8) and 3.2 (factor 32) GGUFs carry only ``rope_freqs``; the config comes back exact."""
    from pktjax.gguf_io import llama3_rope_from_factors

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": factor, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    hf = dict(hidden_size=2048, num_attention_heads=32, head_dim=64, rope_parameters=rope,
              max_position_embeddings=131072)
    got = llama3_rope_from_factors(_llama3_rope_factors(hf).astype(np.float64), 500000.0, 64, Path("x.gguf"))
    assert got == {k: v for k, v in rope.items() if k != "rope_theta"}


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0])
def test_own_reader_equals_gguf_reader(gguf_file, qtype):
    """pktjax's header parser gives gguf's own reader's metadata values and tensor bytes."""
    from gguf import GGUFReader

    from pktjax.gguf_format import read_gguf

    _, path, _ = gguf_file("qwen2", qtype)
    ours, theirs = read_gguf(path), GGUFReader(path)
    assert ours.fields.keys() == {k for k in theirs.fields if not k.startswith("GGUF.")}
    for key in ours.fields:
        assert ours.fields[key] == theirs.fields[key].contents(), key
    assert ours.tensors.keys() == {t.name for t in theirs.tensors}
    for t in theirs.tensors:
        mine = ours.tensors[t.name]
        assert mine.shape == tuple(reversed(t.shape.tolist())) and mine.tensor_type == t.tensor_type
        assert mine.data.tobytes() == np.ascontiguousarray(t.data).tobytes(), t.name


def test_tokenizer_from_gguf_is_cached(gguf_file, tmp_path, monkeypatch):
    monkeypatch.setenv("PKTJAX_HOME", str(tmp_path))
    _, path, _ = gguf_file("llama3")
    first = pktjax.load_tokenizer(path)
    cached = list((tmp_path / "tokenizers").iterdir())
    assert len(cached) == 1 and (cached[0] / "tokenizer_config.json").is_file()
    again = pktjax.load_tokenizer(path)
    text = "def f(x):\n    return x + 1  # wörld"
    assert again(text)["input_ids"] == first(text)["input_ids"] and again.eos_token_id == first.eos_token_id


def test_dequantized_gguf_is_cached_once(gguf_file, tmp_path, monkeypatch):
    """The first load writes the dequantized weights under $PKTJAX_HOME/dequantized; later loads read them back
    (bit-identical, no dequantization) and PKTJAX_GGUF_CACHE=0 bypasses the cache."""
    from pktjax import gguf_io

    monkeypatch.setenv("PKTJAX_HOME", str(tmp_path))
    _, path, decoded = gguf_file("qwen2", Q.Q8_0)
    first = pktjax.load_model(path)
    files = list((tmp_path / "dequantized").glob("*/model.safetensors"))
    assert len(files) == 1 and not list((tmp_path / "dequantized").glob("*/.*tmp"))

    def refuse(*a, **k):
        raise AssertionError("dequantized again")

    monkeypatch.setattr(gguf_io, "_dequantize", refuse)
    again = pktjax.load_model(path)
    for (name, arr), (_, ref) in zip(iter_hf_tensors(again.params, again.config),
                                     iter_hf_tensors(first.params, first.config)):
        np.testing.assert_array_equal(arr, ref, err_msg=name)
        np.testing.assert_array_equal(arr, decoded[name], err_msg=name)
    assert again.config == first.config
    monkeypatch.setenv("PKTJAX_GGUF_CACHE", "0")
    with pytest.raises(AssertionError, match="dequantized again"):
        pktjax.load_model(path)
