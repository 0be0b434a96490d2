"""LaTen end to end on a tiny teacher/student pair: aligner gradient, training, resume, skipped steps, bad input,
fuse (transformers loads the result) and the command line.

All runs share one set of shapes (short examples, cutoff 48, micro-batches of 2) so each function compiles once.
"""

from __future__ import annotations

import importlib
import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pktjax
from pktjax.data import tokenize_laten
from pktjax.errors import ConfigError, DataError, PairError
from pktjax.inject import delta_sizes
from pktjax.train_aligner import (TrainConfig, aligner_steps, load_aligner, locate_and_extract, lr_schedule,
                                  micro_batches, prepare_pair, step_gradients)
from tests import tiny

ta = importlib.import_module("pktjax.train_aligner")  # the module (pktjax.train_aligner is the function)
CFG = TrainConfig(examples_per_step=4, cutoff_len=48, micro_batch=2, bucket=16, lr=1e-2, train_on_inputs=True)


def _example(i: int) -> dict:
    a, b = 3 + i, 11 + 2 * i
    return {"messages": [{"role": "user", "content": f"Q{i}: what is {a}+{b}?"},
                         {"role": "assistant", "content": f"The sum is {a + b}."}]}


EXTRACT = [_example(i) for i in range(3)]
ALIGN = [_example(i) for i in range(10, 16)]


@pytest.fixture(scope="module")
def dirs(tiny_dir):
    return tiny_dir("llama2", seed=1, hidden=48, layers=3, inter=64), tiny_dir("llama2")


@pytest.fixture(scope="module")
def pair(dirs):
    return prepare_pair(*dirs, rate=0.1)


def _leaves_equal(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def trained(pair, tmp_path_factory):
    """An uninterrupted 3-step run."""
    out = tmp_path_factory.mktemp("aligner-full")
    final = pktjax.train_aligner(pair.teacher, pair.student, EXTRACT, ALIGN, out, CFG, tokenizer=pair.tokenizer,
                                 progress=False)
    return out, final


def test_gradient_matches_finite_differences(pair):
    knowledge, _, sel_s = locate_and_extract(pair, EXTRACT[0])
    items = [tokenize_laten(pair.tokenizer, e, 48, True) for e in ALIGN[:3] + EXTRACT[:1]]
    batches = micro_batches(items, 2, pair.tokenizer.eos_token_id, 16, 48)
    # a larger init than 1e-5 so that the deltas (~0.05) move the student's loss measurably
    aligner = jax.tree.map(lambda w: w * 1e4, pktjax.init_aligner(jax.random.PRNGKey(3), pair.modules, 48, 32))
    rng = np.random.default_rng(0)
    for lam in (1000.0, 0.0):
        _, _, _, grads = step_gradients(aligner, pair.student, sel_s, knowledge, batches, lam)
        for _ in range(2):
            v = jax.tree.map(lambda w: jnp.asarray(rng.standard_normal(w.shape), jnp.float32) * 0.1, aligner)
            eps = 1e-3  # small enough that few ReLU kinks are crossed; float32 loss still resolves it
            loss = lambda s: float(step_gradients(jax.tree.map(lambda w, d: w + s * d, aligner, v),  # noqa: E731
                                                  pair.student, sel_s, knowledge, batches, lam)[0])
            fd = (loss(eps) - loss(-eps)) / (2 * eps)
            exact = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(v)))
            # Each float32 loss is off by a few units of roundoff (u = 2^-24) of its size, so the difference
            # quotient carries up to ~2 u |L| / (2 eps) of noise whatever the gradient: at lam = 0 (L ~ 24) that
            # is ~1.4e-3, above 0.5% of a 0.24 derivative. Allow 4 such units; 0.5% covers the O(eps^2) term.
            noise = 4 * 2.0 ** -24 * abs(loss(0.0)) / eps
            assert fd == pytest.approx(exact, rel=5e-3, abs=noise), (lam, fd, exact, noise)


def test_training_writes_steps_and_log(trained):
    out, final = trained
    assert aligner_steps(out) == [0, 1, 2]
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2] and not any(r["skipped"] for r in log)
    assert all(np.isfinite([r["loss"], r["ce"], r["mse"]]).all() for r in log)
    assert sorted(r["example"] for r in log) == [0, 1, 2]
    assert log[1]["align_examples"] == random.Random(1).sample(range(len(ALIGN)), 3)
    assert _leaves_equal(load_aligner(out, 2), final)
    assert not _leaves_equal(load_aligner(out, 0), load_aligner(out, 1))
    # the schedule spans the whole extract split (3 examples here)
    assert [r["lr"] for r in log] == [lr_schedule(CFG.lr, 3)(s) for s in range(3)]
    assert json.loads((out / "run.json").read_text())["schedule_steps"] == 3


def test_log_records_what_each_checkpoint_injects(pair, trained):
    """``delta`` of step t: the sizes of what the aligner saved after step t injects on step t's selection."""
    out, _ = trained
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    for rec in log:
        knowledge, _, sel_s = locate_and_extract(pair, EXTRACT[rec["example"]])
        want = delta_sizes(pair.student.params, pair.student.config, sel_s,
                           pktjax.align(load_aligner(out, rec["step"]), knowledge))
        assert set(rec["delta"]) == {*pair.modules, "all"}
        for m, size in want.items():
            for key in ("rms", "weight_rms", "relative"):
                assert rec["delta"][m][key] == pytest.approx(size[key], rel=1e-6), (rec["step"], m, key)
    # one update (lr 1e-2 here) moves the output far from that of the 1e-5 initialisation
    knowledge, _, sel_s = locate_and_extract(pair, EXTRACT[log[0]["example"]])
    init = pktjax.init_aligner(jax.random.PRNGKey(CFG.seed), pair.modules, 48, 32)
    before = delta_sizes(pair.student.params, pair.student.config, sel_s, pktjax.align(init, knowledge))
    assert log[0]["delta"]["all"]["rms"] > 10 * before["all"]["rms"] > 0


def test_stopping_early_then_going_on_equals_running_through(pair, trained, tmp_path):
    """``steps`` stops the run without reshaping the schedule: one step, then the rest on the same folder, gives
    the uninterrupted run's checkpoints bit for bit, and the same learning rate at every step."""
    one = pktjax.train_aligner(pair.teacher, pair.student, EXTRACT, ALIGN, tmp_path, TrainConfig(
        **{**CFG.__dict__, "steps": 1}), tokenizer=pair.tokenizer, progress=False)
    full_dir, full = trained
    assert aligner_steps(tmp_path) == [0] and _leaves_equal(one, load_aligner(full_dir, 0))
    final = pktjax.train_aligner(pair.teacher, pair.student, EXTRACT, ALIGN, tmp_path, CFG,
                                 tokenizer=pair.tokenizer, progress=False)
    assert _leaves_equal(final, full)
    for s in (0, 1, 2):
        assert _leaves_equal(load_aligner(tmp_path, s), load_aligner(full_dir, s))
    read = lambda d: [json.loads(x) for x in (d / "log.jsonl").read_text().splitlines()]  # noqa: E731
    drop = ("seconds",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in read(tmp_path)] == \
        [{k: v for k, v in r.items() if k not in drop} for r in read(full_dir)]


def test_resume_after_crash_equals_uninterrupted(pair, trained, tmp_path, capsys):
    def crash(step, metrics):
        if step == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pktjax.train_aligner(pair.teacher, pair.student, EXTRACT, ALIGN, tmp_path, CFG, tokenizer=pair.tokenizer,
                             callback=crash, progress=False)
    assert aligner_steps(tmp_path) == [0]
    capsys.readouterr()
    final = pktjax.train_aligner(pair.teacher, pair.student, EXTRACT, ALIGN, tmp_path, CFG,
                                 tokenizer=pair.tokenizer, progress=True)
    # off a terminal, progress is one line per step, carrying the loss of the step it counts
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("aligner: ") and "loss=" in x]
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [x.split(" (")[0] for x in lines] == ["aligner: 2/3 step", "aligner: 3/3 step"]
    assert [x.split("loss=")[1].split(",")[0] for x in lines] == [f"{r['loss']:.4g}" for r in log[1:]]
    full_dir, full = trained
    assert _leaves_equal(final, full)
    for s in (0, 1, 2):
        assert _leaves_equal(load_aligner(tmp_path, s), load_aligner(full_dir, s))
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 3
    with pytest.raises(ConfigError, match="different aligner run"):
        pktjax.train_aligner(pair.teacher, pair.student, EXTRACT, ALIGN, tmp_path, TrainConfig(**{
            **CFG.__dict__, "lr": 1e-3}), tokenizer=pair.tokenizer, progress=False)
    # how examples are cut into micro-batches and padded only moves memory: a resume may change it
    again = pktjax.train_aligner(pair.teacher, pair.student, EXTRACT, ALIGN, tmp_path, TrainConfig(**{
        **CFG.__dict__, "micro_batch": CFG.micro_batch + 1, "bucket": 32}), tokenizer=pair.tokenizer, progress=False)
    assert _leaves_equal(again, full)


def test_non_finite_step_is_skipped(pair, tmp_path, monkeypatch):
    real = ta.step_gradients
    calls = []

    def flaky(*args):
        loss, ce, mse, grads = real(*args)
        calls.append(1)
        return (jnp.nan if len(calls) == 2 else loss), ce, mse, grads

    monkeypatch.setattr(ta, "step_gradients", flaky)
    pktjax.train_aligner(pair.teacher, pair.student, EXTRACT, ALIGN, tmp_path, CFG, tokenizer=pair.tokenizer,
                         progress=False)
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in log] == [False, True, False]
    assert _leaves_equal(load_aligner(tmp_path, 0), load_aligner(tmp_path, 1))
    assert not _leaves_equal(load_aligner(tmp_path, 1), load_aligner(tmp_path, 2))


def test_only_process_zero_writes_run_and_log(pair, trained, tmp_path, monkeypatch):
    """Another process of a multi-host run saves its orbax shards but writes no run.json or log.jsonl."""
    from pktjax import sharding

    monkeypatch.setattr(sharding, "is_main_process", lambda: False)
    final = pktjax.train_aligner(pair.teacher, pair.student, EXTRACT, ALIGN, tmp_path, CFG, tokenizer=pair.tokenizer,
                                 progress=False)
    assert aligner_steps(tmp_path) == [0, 1, 2] and _leaves_equal(final, trained[1])
    assert not (tmp_path / "run.json").exists() and not (tmp_path / "log.jsonl").exists()


def _no_loading(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the input was checked")

    monkeypatch.setattr(ta, "load_model", refuse)


def test_bad_input_fails_before_loading(dirs, tiny_dir, tmp_path, monkeypatch):
    teacher, student = dirs
    _no_loading(monkeypatch)
    run = lambda t, s, cfg=CFG, ex=EXTRACT, al=ALIGN: pktjax.train_aligner(  # noqa: E731
        t, s, ex, al, tmp_path / "out", cfg, progress=False)
    with pytest.raises(PairError, match="vocabulary"):
        run(teacher, tiny_dir("llama2", vocab=300))
    with pytest.raises(PairError, match="not larger"):
        run(student, teacher)
    with pytest.raises(ConfigError, match="v_proj"):
        run(tiny_dir("llama3", hidden=48, layers=3, inter=64), tiny_dir("llama3"),
            TrainConfig(**{**CFG.__dict__, "modules": ("up_proj", "v_proj")}))
    for rate in (0.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match="rate"):
            run(teacher, student, TrainConfig(**{**CFG.__dict__, "rate": rate}))
    with pytest.raises(DataError, match="empty"):
        run(teacher, student, ex=[])
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty"):
        run(teacher, student, al=tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match="align split has"):
        run(teacher, student, al=ALIGN[:2])
    assert not (tmp_path / "out").exists()


def test_fuse_writes_a_transformers_checkpoint(pair, dirs, trained, tmp_path):
    aligner_dir, _ = trained
    out = pktjax.fuse(pair.teacher, pair.student, aligner_dir, 1, ALIGN, tmp_path / "fused", seed=7,
                      tokenizer=pair.tokenizer)
    # the same injection, recomputed from the parts
    example = ALIGN[random.Random(7).randrange(len(ALIGN))]
    knowledge, _, sel_s = locate_and_extract(pair, example)
    want = pktjax.inject(pair.student.params, pair.student.config, sel_s,
                         pktjax.align(load_aligner(aligner_dir, 1), knowledge))
    fused = pktjax.load_model(out)
    assert _leaves_equal(fused.params, want)
    record = json.loads((out / "injection.json").read_text())
    assert (record["step"], record["seed"], record["rate"]) == (1, 7, 0.1)
    sizes = delta_sizes(pair.student.params, pair.student.config, sel_s,
                        pktjax.align(load_aligner(aligner_dir, 1), knowledge))
    for m, size in sizes.items():
        for key, value in size.items():
            assert record["delta"][m][key] == pytest.approx(value, rel=1e-6), (m, key)
    assert not _leaves_equal(fused.params["layers"]["up_proj"], pair.student.params["layers"]["up_proj"])
    ids = np.asarray([[5, 17, 99, 42, 7, 250, 3, 64]], np.int32)
    ours = np.asarray(pktjax.forward(want, pair.student.config, jnp.asarray(ids)))
    import torch

    with torch.no_grad():
        ref = tiny.torch_model(out)(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    with pytest.raises(pktjax.CheckpointError, match="not an empty folder"):
        pktjax.fuse(pair.teacher, pair.student, aligner_dir, 1, ALIGN, out, tokenizer=pair.tokenizer)
    with pytest.raises(ConfigError, match="saved steps"):
        pktjax.fuse(pair.teacher, pair.student, aligner_dir, 9, ALIGN, tmp_path / "x", tokenizer=pair.tokenizer)


def test_cli_train_and_fuse(dirs, tmp_path):
    from pktjax.cli import main

    teacher, student = dirs
    for name, rows in (("extract", EXTRACT[:2]), ("align", ALIGN), ("train", ALIGN)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--teacher", str(teacher), "--student", str(student), "--task", "mmlu"]
    rc = main(["laten", "train", *common, "--extract", str(tmp_path / "extract.jsonl"), "--align",
               str(tmp_path / "align.jsonl"), "--out", str(tmp_path / "run"), "--lr", "1e-2", "--cutoff-len", "48",
               "--examples-per-step", "4", "--micro-batch", "2", "--bucket", "16", "--no-progress"])
    assert rc == 0 and aligner_steps(tmp_path / "run") == [0, 1]
    rc = main(["laten", "fuse", *common, "--aligner", str(tmp_path / "run"), "--step", "1", "--train",
               str(tmp_path / "train.jsonl"), "--out", str(tmp_path / "fused"), "--rate", "0.2"])
    assert rc == 0 and (tmp_path / "fused" / "config.json").is_file()
    assert main(["laten", "fuse", *common, "--aligner", str(tmp_path / "run"), "--step", "5", "--train",
                 str(tmp_path / "train.jsonl"), "--out", str(tmp_path / "fused2")]) == 2


def test_cli_fuse_names_a_damaged_injection_record(tmp_path, monkeypatch, capsys):
    """The fuse's summary line reads injection.json through its checksum: a damaged or cut one is exit 2 naming
    the file, not a traceback."""
    from pktjax.cli import main
    from pktjax.runfolder import checksum_path, write_json

    out = tmp_path / "fused"
    out.mkdir()
    record = out / "injection.json"
    write_json(record, {"delta": {"all": {"rms": 0.5, "relative": 0.25}}}, checksum=True)
    monkeypatch.setattr(importlib.import_module("pktjax.fuse"), "fuse", lambda *a, **k: out)  # no models needed
    argv = ["laten", "fuse", "--teacher", "t", "--student", "s", "--task", "mmlu", "--aligner", "a", "--step", "0",
            "--out", str(out)]
    assert main(argv) == 0 and "RMS 0.5, 0.25 of the RMS" in capsys.readouterr().out
    for damage, reason in (('{"delta": {"all": {"rms": 0.7, "relative": 0.25}}}', "checksum"),
                           ('{"delta": {"all": ', "not valid JSON")):
        record.write_text(damage)
        if reason != "checksum":
            checksum_path(record).unlink(missing_ok=True)
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"pktjax: error: {record}: the injection record" in err and reason in err, err
        assert "Traceback" not in err


def test_fewer_layers_select_and_fuse_k_layers(pair, dirs, tmp_path):
    """``layers=K``: K paired layers and [K, ...] knowledge, the same pick as locating every neuron; the fuse
    takes K from the run; a K beyond the student's depth is refused before loading."""
    from pktjax.attribution import locate
    from pktjax.select import select

    k = pair.student.config.num_layers - 1
    knowledge, sel_t, sel_s = locate_and_extract(pair, EXTRACT[0], layers=k)
    assert all(v.shape[0] == k for v in knowledge.values()) and sel_s.ffn_layers.shape == (k,)
    full = locate(pair.teacher.params, pair.teacher.config, pair.tokenizer, EXTRACT[:1])
    want = select(full, k, *pair.counts)
    for field in ("ffn_layers", "attn_layers", "ffn_neurons", "attn_neurons"):
        np.testing.assert_array_equal(np.asarray(getattr(sel_t, field)), np.asarray(getattr(want, field)))
    cfg = TrainConfig(**{**CFG.__dict__, "steps": 1, "layers": k})
    pktjax.train_aligner(pair.teacher, pair.student, EXTRACT, ALIGN, tmp_path / "a", cfg, tokenizer=pair.tokenizer,
                         progress=False)
    assert json.loads((tmp_path / "a" / "run.json").read_text())["config"]["layers"] == k
    out = pktjax.fuse(*dirs, tmp_path / "a", 0, ALIGN, tmp_path / "fused")
    fused, base = pktjax.load_model(out), pair.student
    changed = [i for i in range(k + 1) if not np.array_equal(np.asarray(fused.params["layers"]["up_proj"][i]),
                                                             np.asarray(base.params["layers"]["up_proj"][i]))]
    assert 1 <= len(changed) <= k
    with pytest.raises(ConfigError, match="layers=9"):
        pktjax.train_aligner(*dirs, EXTRACT, ALIGN, tmp_path / "b", TrainConfig(**{**CFG.__dict__, "layers": 9}),
                             progress=False)
    assert not (tmp_path / "b" / "run.json").exists()
