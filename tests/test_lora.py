"""LoRA pytrees: inits that keep the logits, PEFT export/import against peft itself, merge, CLI merge, errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import pktjax
from pktjax import lora as L
from pktjax import seeking
from pktjax.errors import CheckpointError, ConfigError
from tests.tiny import VOCAB, torch_model

TEACHER = dict(seed=1, hidden=48, layers=3, inter=64)
IDS = np.random.RandomState(0).randint(3, VOCAB, size=(2, 9))
apply_jit = jax.jit(L.apply, static_argnames=("cfg", "scale"))
forward_jit = jax.jit(pktjax.forward, static_argnums=1)


def _logits(params, cfg, lora=None, scale=1.0):
    if lora is None:
        return np.asarray(forward_jit(params, cfg, jnp.asarray(IDS)))
    return np.asarray(apply_jit(params, cfg, lora, jnp.asarray(IDS), scale=scale))


def _perturb(lora, seed=0, size=0.05):
    """A trained-looking adapter: every factor moved by random noise (so every B is non-zero)."""
    leaves, tree = jax.tree.flatten(lora)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + size * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def _extracted(tiny_dir, family):
    teacher = pktjax.load_model(tiny_dir(family, **TEACHER))
    student_cfg = pktjax.load_model(tiny_dir(family)).config
    leaves, tree = jax.tree.flatten(teacher.params)
    sens = jax.tree.unflatten(tree, [jnp.abs(x) for x in leaves])  # |θ| stands in for a sensitivity
    return seeking.extract_lora(teacher, student_cfg, sens, 4)


@pytest.mark.parametrize("family", ["llama2", "qwen2"])  # untied; tied embeddings with GQA and biases
@pytest.mark.parametrize("method", ["pissa", "seeking"])
def test_init_keeps_logits(tiny_dir, family, method):
    student = pktjax.load_model(tiny_dir(family))
    teacher_lora = _extracted(tiny_dir, family) if method == "seeking" else None
    # Seeking as its authors run it (alpha = r: scale 1); PiSSA with scale 4 (its factors absorb the scale)
    alpha, scale = (4, 1.0) if method == "seeking" else (16, 4.0)
    base, lora = L.init(student.params, student.config, 4, alpha, method=method, teacher_lora=teacher_lora)
    assert L.targets_of(lora) == L.TARGETS
    ref = _logits(student.params, student.config)
    assert np.abs(_logits(base, student.config, lora, scale) - ref).max() <= 1e-5
    assert np.abs(_logits(base, student.config) - ref).max() > 1e-2  # the base really changed
    if method == "pissa":  # scale * b @ a is the rank-4 principal part of W
        w = np.asarray(student.params["layers"]["up_proj"][0])
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        np.testing.assert_allclose(np.asarray(L.delta(lora, "up_proj", 4.0)[0]), (u[:, :4] * s[:4]) @ vt[:4], atol=1e-5)


def test_svds_run_one_at_a_time_outside_any_trace(tiny_dir, monkeypatch):
    """Concurrent CPU SVDs can deadlock, so PiSSA and Seeking call the SVD eagerly, one target at a time: every
    call gets a concrete array (inside a traced computation XLA may run several at once)."""
    student = pktjax.load_model(tiny_dir("qwen2"))
    calls, svd = [], L._svd
    monkeypatch.setattr(L, "_svd", lambda m: calls.append(isinstance(m, jax.core.Tracer)) or svd(m))
    L.init(student.params, student.config, 4, 16, method="pissa")
    _extracted(tiny_dir, "qwen2")
    assert len(calls) == 2 * len(L.TARGETS) and not any(calls)  # one SVD per target and init


def test_default_init_is_peft_standard(tiny_dir):
    student = pktjax.load_model(tiny_dir("llama2"))
    base, lora = L.init(student.params, student.config, 4, 8, key=jax.random.key(3))
    assert base is student.params
    q = lora["layers"]["q_proj"]
    assert not np.any(np.asarray(q["b"])) and 0 < np.abs(np.asarray(q["a"])).max() <= 1 / np.sqrt(32)
    assert not np.any(np.asarray(lora["embed"]["a"])) and np.std(np.asarray(lora["embed"]["b"])) > 0.5
    np.testing.assert_array_equal(_logits(base, student.config, lora, 2.0), _logits(student.params, student.config))


def _peft_logits(folder, adapter):
    from peft import PeftModel

    model = PeftModel.from_pretrained(torch_model(folder), str(adapter)).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS)).logits.numpy()


def test_peft_export_matches_peft(tiny_dir, tmp_path):
    folder = tiny_dir("llama2")
    student = pktjax.load_model(folder)
    _, lora = L.init(student.params, student.config, 4, 8, key=jax.random.key(1))
    lora = _perturb(lora)
    out = L.export_peft(lora, student.config, tmp_path / "adapter", alpha=8)
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["r"] == 4 and conf["lora_alpha"] == 8 and set(conf["target_modules"]) == set(L.TARGETS)
    ours = _logits(student.params, student.config, lora, 2.0)
    assert np.abs(ours - _logits(student.params, student.config)).max() > 1e-2  # the adapter matters
    assert np.abs(_peft_logits(folder, out) - ours).max() <= 1e-4
    back, scale = L.import_peft(out, student.config)
    assert scale == 2.0
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), back, lora)
    with pytest.raises(CheckpointError, match="not empty"):
        L.export_peft(lora, student.config, out, alpha=8)


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")  # peft's note on tied adapters
def test_pissa_export_applies_to_original_tied_student(tiny_dir, tmp_path):
    folder = tiny_dir("qwen2")
    student = pktjax.load_model(folder)
    base, lora0 = L.init(student.params, student.config, 4, 8, method="pissa")
    trained = _perturb(lora0, 2)
    ours = _logits(base, student.config, trained, 2.0)
    out = L.export_peft(trained, student.config, tmp_path / "adapter", alpha=8, initial=lora0)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8  # [b | -b0] [a ; a0]
    assert np.abs(_peft_logits(folder, out) - ours).max() <= 1e-4
    # merging the converted adapter into the original student gives the same model (untied head)
    merged = L.merge_model(student, *L.import_peft(out, student.config))
    assert not merged.config.tie_word_embeddings and "lm_head" in merged.params
    assert np.abs(_logits(merged.params, merged.config) - ours).max() <= 1e-4


def test_merge_equals_apply(tiny_dir):
    student = pktjax.load_model(tiny_dir("llama2"))
    _, lora = L.init(student.params, student.config, 4, 8, key=jax.random.key(5))
    lora = _perturb(lora, 3)
    merged = L.merge(student.params, lora, 2.0)
    np.testing.assert_allclose(_logits(merged, student.config), _logits(student.params, student.config, lora, 2.0),
                               atol=2e-5)


def test_bad_inputs(tiny_dir, tmp_path):
    student = pktjax.load_model(tiny_dir("qwen2"))
    p, cfg = student.params, student.config
    with pytest.raises(ConfigError, match="unknown LoRA target module.*'c_attn'"):
        L.init(p, cfg, 4, 8, ["q_proj", "c_attn"])
    with pytest.raises(ConfigError, match=r"rank 20 does not fit k_proj of shape \[16, 32\]"):
        L.init(p, cfg, 20, 8, ["k_proj"])
    with pytest.raises(ConfigError, match="ties its embedding"):
        L.init(p, cfg, 4, 8, ["lm_head"], method="pissa")
    with pytest.raises(ConfigError, match="needs teacher_lora"):
        L.init(p, cfg, 4, 8, method="seeking")
    with pytest.raises(ConfigError, match="unknown LoRA init"):
        L.init(p, cfg, 4, 8, method="olora")
    _, lora = L.init(p, cfg, 4, 8, ["q_proj"])
    with pytest.raises(ConfigError, match="shape"):  # a rank-8 request for rank-4 factors
        L.init(p, cfg, 8, 8, ["q_proj"], method="seeking", teacher_lora=lora)
    with pytest.raises(ConfigError, match="no factors for v_proj"):
        L.init(p, cfg, 4, 8, ["q_proj", "v_proj"], method="seeking", teacher_lora=lora)
    big = pktjax.load_model(tiny_dir("qwen2", **TEACHER))
    L.export_peft(L.init(big.params, big.config, 4, 8, ["q_proj"])[1], big.config, tmp_path / "big", alpha=8)
    with pytest.raises(CheckpointError, match="different model"):
        L.import_peft(tmp_path / "big", cfg)
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        L.import_peft(tmp_path, cfg)
