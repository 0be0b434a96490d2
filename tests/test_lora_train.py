"""The LoRA trainer: schedule, loss goes down, kill-and-resume gives the same adapter, CLI train + merge."""

import json
import time

import jax
import numpy as np
import pytest

import pktjax
from pktjax import lora as L
from pktjax.data import tokenize_seeking
from pktjax.errors import ConfigError
from pktjax.lora_train import TrainConfig, evaluate, micro_batches, schedule, train

WORDS = ["red", "green", "blue", "gold", "gray", "pink"]
EXAMPLES = [{"messages": [{"role": "user", "content": f"colour {i}?"},
                          {"role": "assistant", "content": f"{WORDS[i % 6]} {WORDS[(i * 5) % 6]}"}]}
            for i in range(12)]
TC = TrainConfig(rank=4, alpha=8, lr=1e-2, epochs=2, batch_size=8, micro_batch=4, bucket=32, seed=0)


@pytest.fixture(scope="module")
def setup(tiny_dir):
    folder = tiny_dir("qwen2")
    student = pktjax.load_model(folder)
    tok = pktjax.load_tokenizer(folder)
    items = [tokenize_seeking(tok, ex) for ex in EXAMPLES]
    base, lora = L.init(student.params, student.config, 4, 8, key=jax.random.key(0))
    return folder, student, items, base, lora


def test_schedule_warmup_then_linear_decay():
    lr = schedule(TrainConfig(lr=1.0), 100)  # ceil(0.03 * 100) = 3 warmup steps, the first at lr 0
    np.testing.assert_allclose([float(lr(s)) for s in (0, 1, 3, 50, 100)], [0, 1 / 3, 1, 50 / 97, 0], atol=1e-6)
    with pytest.raises(ConfigError, match="multiple of micro_batch"):
        TrainConfig(batch_size=10, micro_batch=4).validate()


def test_micro_batches_pad_and_fill(setup):
    _, _, items, _, _ = setup
    batches = micro_batches(items, [5, 0, 3], 2, pad_id=3, bucket=32)
    assert [b.ids.shape for b in batches] == [(2, 64), (2, 64)]
    assert batches[1].mask[1].sum() == 0  # filler row: no tokens, no loss
    assert (batches[0].mask.sum(1) <= batches[1].mask[0].sum()).all()  # sorted by length


def test_training_lowers_loss_and_resume_is_exact(setup, tmp_path):
    _, student, items, base, lora = setup
    before = evaluate(base, student.config, lora, items, scale=TC.scale, pad_id=3, micro_batch=4, bucket=32)
    full = train(base, student.config, lora, items, tmp_path / "full", TC, pad_id=3, progress=False)
    after = evaluate(base, student.config, full, items, scale=TC.scale, pad_id=3, micro_batch=4, bucket=32)
    assert after < before - 0.2
    log = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in log] == [1, 2, 3, 4] and log[0]["lr"] == 0.0 and log[0]["tokens"] > 0

    def crash(step, metrics):
        if step == 3:
            raise KeyboardInterrupt  # killed in the middle of epoch 2 (checkpoint after epoch 1 = step 2)

    with pytest.raises(KeyboardInterrupt):
        train(base, student.config, lora, items, tmp_path / "resumed", TC, pad_id=3, on_step=crash, progress=False)
    resumed = train(base, student.config, lora, items, tmp_path / "resumed", TC, pad_id=3, progress=False)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), resumed, full)
    steps = [json.loads(x)["step"] for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    with pytest.raises(ConfigError, match="different settings"):
        train(base, student.config, lora, items, tmp_path / "resumed", TrainConfig(rank=4, epochs=3), pad_id=3,
              progress=False)


def test_only_process_zero_writes_config_and_metrics(setup, tmp_path, monkeypatch):
    """Another process of a multi-host run saves its orbax shards but writes no config or metrics file."""
    from pktjax import sharding

    _, student, items, base, lora = setup
    monkeypatch.setattr(sharding, "is_main_process", lambda: False)
    train(base, student.config, lora, items, tmp_path, TC, pad_id=3, progress=False)
    assert (tmp_path / "checkpoints").is_dir()
    assert not (tmp_path / "train_config.json").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_logged_step_seconds_cover_the_computation(tmp_path):
    """``seconds`` in metrics.jsonl is a step's whole time, not the time to dispatch it (JAX runs asynchronously)."""
    from pktjax.data import Tokenized
    from pktjax.tiny import random_params, tiny_config

    cfg = tiny_config(hidden=256, layers=4, inter=1024, heads=4, vocab=8000)
    base, lora = L.init(random_params(cfg, jax.random.key(0), 0.05), cfg, 4, 8, key=jax.random.key(1))
    rng = np.random.default_rng(0)
    items = [Tokenized(ids=rng.integers(5, 8000, 256).astype(np.int32),
                       labels=np.where(np.arange(256) < 128, -100, 1).astype(np.int32)) for _ in range(12)]
    ticks = []
    train(base, cfg, lora, items, tmp_path, TrainConfig(rank=4, alpha=8, batch_size=4, micro_batch=4, epochs=1),
          pad_id=0, progress=False, on_step=lambda s, m: ticks.append((time.perf_counter(), m["seconds"])))
    wall = ticks[-1][0] - ticks[0][0]  # steps 2 and 3, compiled already
    logged = ticks[1][1] + ticks[2][1]
    assert 0.7 * wall < logged <= wall, (wall, logged)
