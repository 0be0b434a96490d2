"""Saving and loading Hugging Face checkpoints: transformers reads what pktjax writes, tensors survive a round
trip bit for bit, sharded and bf16 checkpoints load, and a failed save leaves nothing behind."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors import safe_open

import pktjax
from pktjax import checkpoint
from pktjax.config import ModelConfig
from tests.tiny import FAMILIES, VOCAB, torch_model


_forward = jax.jit(pktjax.forward, static_argnums=1)


def _logits(model, ids, mask) -> np.ndarray:
    return np.asarray(_forward(model.params, model.config, jnp.asarray(ids), jnp.asarray(mask)))


def _batch(t=8):
    ids = np.random.RandomState(5).randint(4, VOCAB, size=(2, t))
    mask = np.ones_like(ids)
    mask[0, :3] = 0
    return ids, mask


def _torch_logits(folder, ids, mask):
    pos = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        return torch_model(folder)(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                                   position_ids=torch.tensor(pos)).logits.float().numpy()


def _tensors(folder) -> dict[str, bytes]:
    """Every tensor of a checkpoint folder as (dtype, shape, raw bytes), read with the safetensors library."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, framework="pt") as fh:
            for name in fh.keys():
                t = fh.get_tensor(name)
                out[name] = (str(t.dtype), tuple(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes())
    return out


def _leftover_temp_dirs(parent):
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_checkpoint_loads_in_transformers_with_same_logits(tiny_dir, tmp_path, family):
    model = pktjax.load_model(tiny_dir(family))
    out = pktjax.save_model(model, tmp_path / "saved")
    ids, mask = _batch()
    ours = _logits(model, ids, mask)
    theirs = _torch_logits(out, ids, mask)
    assert np.abs(ours - theirs)[mask.astype(bool)].max() <= 1e-4
    back = ModelConfig.from_file(out / "config.json")
    assert back == model.config
    assert (out / "tokenizer.json").is_file()


@pytest.mark.parametrize("family", FAMILIES)
def test_safetensors_round_trip_is_bit_exact(tiny_dir, tmp_path, family):
    src = tiny_dir(family)
    out = pktjax.save_model(pktjax.load_model(src), tmp_path / "saved")
    before, after = _tensors(src), _tensors(out)
    assert sorted(after) == sorted(before)
    for name in before:
        assert after[name] == before[name], name


def test_sharded_save_writes_an_index_and_loads_back_equal(tiny_dir, tmp_path):
    model = pktjax.load_model(tiny_dir("llama2"))
    out = pktjax.save_model(model, tmp_path / "sharded", shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == [p.name for p in shards]
    names = [n for n, _ in checkpoint.iter_hf_tensors(model.params, model.config)]
    assert sorted(index["weight_map"]) == sorted(names)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in jax.tree.leaves(model.params))
    back = pktjax.load_model(out)
    jax.tree.map(np.testing.assert_array_equal, back.params, model.params)
    ids, mask = _batch()
    ours = _logits(model, ids, mask)
    assert np.abs(_torch_logits(out, ids, mask) - ours)[mask.astype(bool)].max() <= 1e-4


@pytest.fixture(scope="module")
def bf16_dir(tiny_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bf16")
    torch_model(tiny_dir("qwen2")).to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    return folder


def test_bf16_checkpoint_loads_as_float32_and_bfloat16(bf16_dir, tmp_path):
    ref = {k: v.float().numpy() for k, v in torch_model(bf16_dir).to(torch.bfloat16).state_dict().items()}
    f32 = pktjax.load_model(bf16_dir)
    bf16 = pktjax.load_model(bf16_dir, dtype=jnp.bfloat16)
    assert f32.params["embed"].dtype == jnp.float32 and bf16.params["embed"].dtype == jnp.bfloat16
    for (name, a), (_, b) in zip(checkpoint.iter_hf_tensors(f32.params, f32.config),
                                 checkpoint.iter_hf_tensors(bf16.params, bf16.config)):
        np.testing.assert_array_equal(a, ref[name], err_msg=name)  # bf16 -> f32 is exact
        assert b.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(b.astype(np.float32), ref[name], err_msg=name)
    # a bf16 model saves back to the very same bf16 tensors
    out = pktjax.save_model(bf16, tmp_path / "bf16-again")
    assert _tensors(out) == _tensors(bf16_dir)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_bf16_forward_is_close_to_float32(bf16_dir):
    f32 = pktjax.load_model(bf16_dir)
    bf16 = pktjax.load_model(bf16_dir, dtype=jnp.bfloat16)
    ids, mask = _batch()
    a = _logits(f32, ids, mask)
    b = _logits(bf16, ids, mask).astype(np.float32)
    valid = mask.astype(bool)
    # bf16 keeps 8 mantissa bits (relative step 2^-8 = 0.4%); two layers of rounding stay within a few percent
    assert np.sqrt(np.mean((a - b)[valid] ** 2) / np.mean(a[valid] ** 2)) < 0.05


def test_save_refuses_a_non_empty_folder(tiny_dir, tmp_path):
    model = pktjax.load_model(tiny_dir("llama2"))
    target = tmp_path / "busy"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(pktjax.CheckpointError, match="busy: folder exists and is not empty"):
        pktjax.save_model(model, target)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    assert _leftover_temp_dirs(tmp_path) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (pktjax.save_model(model, empty) / "model.safetensors").is_file()


def test_failed_save_leaves_no_temp_folder(tiny_dir, tmp_path, monkeypatch):
    model = pktjax.load_model(tiny_dir("llama2"))

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_safetensors", disk_full)
    with pytest.raises(OSError, match="No space left"):
        pktjax.save_model(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_load_model_onto_a_mesh_equals_plain_load(tiny_dir):
    from pktjax.sharding import make_mesh

    folder = tiny_dir("qwen2")
    plain = pktjax.load_model(folder)
    sharded = pktjax.load_model(folder, mesh=make_mesh(None))
    for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(sharded.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert all(hasattr(x.sharding, "spec") for x in jax.tree.leaves(sharded.params))
