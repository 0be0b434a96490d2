"""Bad checkpoints fail with a pktjax error that names the file and the problem, not a traceback from numpy."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from gguf import GGUFWriter
from safetensors.numpy import load_file, save_file

import pktjax
from pktjax import CheckpointError, ConfigError, PktjaxError


@pytest.fixture
def copy_of(tiny_dir, tmp_path):
    """``copy_of(family) -> Path``: a private copy of a tiny checkpoint folder that a test may damage."""
    def make(family="llama2"):
        dest = tmp_path / f"{family}-copy"
        shutil.copytree(tiny_dir(family), dest)
        return dest
    return make


def _raises(path, kind=PktjaxError):
    """Load ``path`` expecting ``kind``; returns the message."""
    with pytest.raises(kind) as info:
        pktjax.load_model(path)
    assert isinstance(info.value, PktjaxError)
    return str(info.value)


def test_missing_config_json(copy_of):
    folder = copy_of()
    (folder / "config.json").unlink()
    msg = _raises(folder, ConfigError)
    assert str(folder / "config.json") in msg and "no config.json" in msg


def test_unknown_model_type(copy_of):
    folder = copy_of()
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "model_type": "gpt_neox"}))
    msg = _raises(folder, ConfigError)
    assert str(folder / "config.json") in msg and "model_type 'gpt_neox' is not supported" in msg


def test_missing_config_key(copy_of):
    folder = copy_of()
    raw = json.loads((folder / "config.json").read_text())
    del raw["hidden_size"]
    (folder / "config.json").write_text(json.dumps(raw))
    msg = _raises(folder, ConfigError)
    assert "config.json" in msg and "'hidden_size' is missing" in msg


def test_tensor_of_wrong_shape(copy_of):
    folder = copy_of()
    file = folder / "model.safetensors"
    tensors = load_file(file)
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name] = np.ascontiguousarray(tensors[name].T)  # [48, 32] stored as [32, 48]
    save_file(tensors, file)
    msg = _raises(folder, CheckpointError)
    assert str(file) in msg and name in msg and "shape [32, 48]" in msg and "implies [48, 32]" in msg


def test_missing_tensor(copy_of):
    folder = copy_of()
    file = folder / "model.safetensors"
    tensors = load_file(file)
    del tensors["model.norm.weight"]
    save_file(tensors, file)
    msg = _raises(folder, CheckpointError)
    assert str(folder) in msg and "'model.norm.weight' is missing" in msg


@pytest.mark.parametrize("keep", [0.5, 0.999, 6 / 1e9])
def test_truncated_safetensors(copy_of, keep):
    """Cut in the tensor data, at the very end, and inside the 8-byte header length."""
    folder = copy_of()
    file = folder / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: max(int(len(data) * keep), 6)])
    msg = _raises(folder, CheckpointError)
    assert str(file) in msg and "truncated" in msg


def test_index_names_a_missing_shard(copy_of):
    folder = copy_of()
    names = list(load_file(folder / "model.safetensors"))
    weight_map = {n: "model-00001-of-00002.safetensors" for n in names}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    msg = _raises(folder, CheckpointError)
    assert "model.safetensors.index.json" in msg and "model-00001-of-00002.safetensors" in msg and "missing" in msg


def test_path_that_does_not_exist(tmp_path):
    msg = _raises(tmp_path / "nowhere", CheckpointError)
    assert str(tmp_path / "nowhere") in msg and "no such file or folder" in msg


def _tiny_gguf(path, arch):
    w = GGUFWriter(path, arch)
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_tensor("token_embd.weight", np.zeros((16, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_of_unsupported_architecture(tmp_path):
    path = _tiny_gguf(tmp_path / "model.gguf", "gpt2")
    msg = _raises(path, CheckpointError)
    assert str(path) in msg and "architecture 'gpt2' is not supported" in msg


def test_gguf_missing_metadata(tmp_path):
    path = _tiny_gguf(tmp_path / "model.gguf", "llama")  # no head count
    msg = _raises(path, CheckpointError)
    assert str(path) in msg and "'llama.attention.head_count' is missing" in msg


@pytest.mark.parametrize("cut", [0.5, 0.95])
def test_truncated_or_garbage_gguf(tmp_path, cut):
    path = _tiny_gguf(tmp_path / "model.gguf", "llama")
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * cut)])
    msg = _raises(path, CheckpointError)
    assert str(path) in msg and "not a readable GGUF file" in msg
    path.write_bytes(b"not a gguf at all, just text")
    assert "not a readable GGUF file" in _raises(path, CheckpointError)


def test_gguf_without_tokenizer_metadata(tmp_path):
    path = _tiny_gguf(tmp_path / "model.gguf", "llama")
    with pytest.raises(CheckpointError, match="cannot build a tokenizer from this GGUF"):
        pktjax.load_tokenizer(path)


def test_gguf_with_tensors_pktjax_does_not_know(tmp_path):
    """A fused or extra weight would be silently dropped; refuse the file instead."""
    path = tmp_path / "fused.gguf"
    w = GGUFWriter(path, "llama")
    for key, value in (("block_count", 1), ("embedding_length", 8), ("feed_forward_length", 16),
                       ("attention.head_count", 2)):
        w.add_uint32(f"llama.{key}", value)
    w.add_tensor("token_embd.weight", np.zeros((16, 8), np.float32))
    w.add_tensor("blk.0.attn_qkv.weight", np.zeros((24, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    msg = _raises(path, CheckpointError)
    assert str(path) in msg and "'blk.0.attn_qkv.weight'" in msg and "cannot load" in msg
