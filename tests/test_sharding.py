"""Sharding (SPEC §7): partition rules, meshes, and the sharded programs on 8 simulated CPU devices.

jax fixes its device count when it starts, so every multi-device check runs in a child process (see
``tests/sharding_checks.py``) with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``. The children of this
module start together, a few at a time, when the first of their tests runs; each test then waits for its own.
The multi-process check starts two processes that meet through ``jax.distributed.initialize`` on 127.0.0.1.
"""

from __future__ import annotations

import concurrent.futures
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from pktjax import sharding as S
from pktjax.errors import CheckpointError, ConfigError

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600  # per child; a hung child fails its test instead of the whole run
WORKER_TIMEOUT_S = 300
CHECKS = {  # test name -> check name, the most expensive first (they start in this order)
    "test_train_aligner_with_mesh_matches_one_device": "train_aligner",
    "test_lora_train_with_mesh_matches_one_device": "lora_train",
    "test_semalign_fit_with_mesh_matches_one_device": "semalign",
    "test_lora_step_matches_one_device": "lora",
    "test_aligner_step_matches_one_device": "aligner",
    "test_attribution_matches_one_device": "attribution",
    "test_forward_matches_one_device_and_rules": "forward",
    "test_orbax_save_on_one_mesh_restore_on_another": "orbax",
    "test_load_params_streams_into_shardings": "load",
}


def _env(devices: int | None) -> dict[str, str]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("XLA_FLAGS", None)
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _child(args: list[str], devices: int | None, timeout: float) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "tests.sharding_checks", *args]
    try:
        return subprocess.run(cmd, cwd=ROOT, env=_env(devices), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        err = f"{e.stderr or ''}\nTIMED OUT after {timeout}s"
        return subprocess.CompletedProcess(cmd, -9, str(e.stdout or ""), err)


def _report(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-8000:]}"


@pytest.fixture(scope="module")
def checks(request):
    """``checks(name) -> CompletedProcess`` of ``python -m tests.sharding_checks name`` on 8 CPU devices; the
    checks of every selected test of this module start at once (at most ``min(3, cpus)`` at a time)."""
    selected = {item.name for item in request.session.items if item.module.__name__ == __name__}
    names = [c for t, c in CHECKS.items() if t in selected]
    pool = concurrent.futures.ThreadPoolExecutor(max(1, min(3, os.cpu_count() or 1)))
    futures = {n: pool.submit(_child, [n], 8, TIMEOUT_S) for n in names}
    yield lambda name: futures[name].result()
    pool.shutdown(wait=True, cancel_futures=True)


def _check(checks, name: str) -> None:
    proc = checks(name)
    assert proc.returncode == 0 and f"{name} ok" in proc.stdout, _report(proc)


# ------------------------------------------------------------------------------- in-process: rules and meshes

MESH3 = {"data": 2, "fsdp": 2, "tensor": 2}


def test_parse_mesh_spec_and_errors():
    assert S.parse_mesh_spec("data=2,fsdp=2,tensor=2", 8) == MESH3
    assert S.parse_mesh_spec(None, 4) == {"data": 1, "fsdp": 4, "tensor": 1}
    assert S.parse_mesh_spec(" tensor = 2 , fsdp=-1", 8) == {"data": 1, "fsdp": 4, "tensor": 2}
    with pytest.raises(ConfigError, match="multiply to 4 but 8 devices"):
        S.parse_mesh_spec("fsdp=4", 8)
    for bad in ("model=8", "fsdp", "fsdp=two", "fsdp=0,data=8", "data=-1,fsdp=-1", "data=3,fsdp=-1"):
        with pytest.raises(ConfigError, match="mesh"):
            S.parse_mesh_spec(bad, 8)
    mesh = S.make_mesh()  # one CPU device here: everything on fsdp
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}


def test_rules_for_weights_lora_aligner_and_optimizer_state():
    shapes = {
        "embed": (260, 64), "lm_head": (260, 64), "final_norm": (64,),
        "layers": {"q_proj": (3, 64, 64), "o_proj": (3, 64, 64), "down_proj": (3, 64, 128),
                   "q_bias": (3, 64), "input_norm": (3, 64)},
    }
    tree = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, np.float32), shapes, is_leaf=lambda x: isinstance(x, tuple))
    specs = S.param_specs(tree, MESH3)
    assert specs["embed"] == P("tensor", "fsdp") and specs["final_norm"] == P(None)
    assert specs["layers"]["q_proj"] == P(None, "tensor", "fsdp")
    assert specs["layers"]["o_proj"] == specs["layers"]["down_proj"] == P(None, "fsdp", "tensor")
    assert specs["layers"]["q_bias"] == specs["layers"]["input_norm"] == P(None, None)
    lora = {"layers": {"up_proj": {"a": np.zeros((3, 4, 64)), "b": np.zeros((3, 128, 4))},
                       "down_proj": {"a": np.zeros((3, 4, 128)), "b": np.zeros((3, 64, 4))}},
            "embed": {"a": np.zeros((4, 260)), "b": np.zeros((64, 4))},
            "lm_head": {"a": np.zeros((4, 64)), "b": np.zeros((260, 4))}}
    aligner = {"up_proj": {"w1": np.zeros((64, 64), np.float32), "w2": np.zeros((32, 64), np.float32)}}
    opt = jax.eval_shape(optax.adamw(1e-3).init, {"lora": lora, "aligner": aligner})
    for tree, prefix in ((lora, ""), (opt[0].mu["lora"], "mu/"), (opt[0].nu["lora"], "nu/")):
        got = S.param_specs(tree, MESH3)
        assert got["layers"]["up_proj"] == {"a": P(None, None, "fsdp"), "b": P(None, "tensor", None)}, prefix
        assert got["layers"]["down_proj"] == {"a": P(None, None, "tensor"), "b": P(None, "fsdp", None)}, prefix
        assert got["embed"] == {"a": P(None, "tensor"), "b": P("fsdp", None)}, prefix
        assert got["lm_head"] == {"a": P(None, "fsdp"), "b": P("tensor", None)}, prefix
    for tree in (aligner, opt[0].mu["aligner"]):
        assert S.param_specs(tree, MESH3)["up_proj"] == {"w1": P("tensor", "fsdp"), "w2": P("fsdp", "tensor")}
    assert S.param_specs(opt, MESH3)[0].count == P()


def test_non_divisible_dims_fall_back_to_replication():
    mesh = {"data": 2, "fsdp": 3, "tensor": 4}
    assert S.spec_for("embed", (262, 60), mesh) == P(None, "fsdp")  # 262 % 4 != 0
    assert S.spec_for("layers/up_proj", (2, 44, 64), mesh) == P(None, "tensor", None)  # 64 % 3 != 0
    assert S.batch_spec((12, 7), mesh) == P(("data", "fsdp"), None)
    assert S.batch_spec((4, 7), mesh) == P("data", None)  # 4 % 6 != 0: data only
    assert S.batch_spec((3, 7, 262), mesh, last="tensor") == P(None, None, None)
    assert S.per_device_bytes((262, 60), np.float32, P(None, "fsdp"), mesh) == 262 * 20 * 4


def test_distributed_detection(monkeypatch):
    assert not S.launched_on_cluster({})
    assert not S.launched_on_cluster({"TPU_WORKER_HOSTNAMES": "10.0.0.2"})  # a single-host TPU VM
    assert S.launched_on_cluster({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"})
    assert S.launched_on_cluster({"SLURM_NTASKS": "4"}) and not S.launched_on_cluster({"SLURM_NTASKS": "1"})
    assert S.launched_on_cluster({"JAX_COORDINATOR_ADDRESS": "h:1234", "JAX_NUM_PROCESSES": "2"})
    assert S.launched_on_cluster({"PKTJAX_DISTRIBUTED": "1"})  # tpu_setup/launch.sh on a TPU VM or slice
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    assert S.initialize_distributed({}) is False and not calls
    env = {"JAX_COORDINATOR_ADDRESS": "h:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert S.initialize_distributed(env, timeout_s=30) is True
    assert calls == [{"initialization_timeout": 30, "coordinator_address": "h:1234", "num_processes": 2,
                      "process_id": 1}]
    assert S.is_main_process()


class _WholeTensors:
    """A tensor source that can only hand out whole tensors (like a quantized GGUF file)."""

    def __init__(self, inner):
        self.inner, self.path = inner, None

    def names(self):
        return self.inner.names()

    def shape(self, name):
        return self.inner.shape(name)

    def get(self, name):
        return self.inner.get(name)


def test_cli_rejects_a_bad_mesh_before_loading(tmp_path, capsys, monkeypatch):
    """``--mesh`` errors are ConfigErrors (exit 2) raised before any model is read; a single plain process never
    calls ``jax.distributed.initialize``."""
    from pktjax.cli import main

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    missing, out = str(tmp_path / "missing"), str(tmp_path / "out")
    laten = ["laten", "train", "--teacher", missing, "--student", missing, "--task", "gsm", "--out", out]
    lora = ["lora", "train", "--student", missing, "--task", "gsm", "--out", out]
    for argv, want in ((laten + ["--mesh", "data=2"], "multiply to 2 but 1 devices"),
                       (lora + ["--mesh", "fsdp=x"], "must be an integer")):
        assert main(argv) == 2
        assert want in capsys.readouterr().err
    assert not calls and not (tmp_path / "out").exists()


def test_load_params_on_one_device_from_any_source(tmp_path):
    from pktjax.checkpoint import SafetensorsSource, load_model
    from tests.sharding_checks import save_random, student_cfg

    folder = save_random(tmp_path / "ckpt", student_cfg(model_type="qwen2", kv_heads=2), 1)
    want = load_model(folder)
    for source in (SafetensorsSource(folder), _WholeTensors(SafetensorsSource(folder))):
        got = S.load_params(want.config, source)
        jax.tree.map(np.testing.assert_array_equal, got, want.params)
    with pytest.raises(CheckpointError, match="do not belong to this config"):
        S.load_params(student_cfg(inter=72), SafetensorsSource(folder))


# ------------------------------------------------------------------------------------- on 8 simulated devices

def test_forward_matches_one_device_and_rules(checks):
    """8x1, 4x2, 2x2x2 (+ tensor=8 with V=260, f=44 not divisible): logits equal, each weight sharded by rule."""
    _check(checks, "forward")


def test_load_params_streams_into_shardings(checks):
    _check(checks, "load")


def test_orbax_save_on_one_mesh_restore_on_another(checks):
    _check(checks, "orbax")


def test_attribution_matches_one_device(checks):
    _check(checks, "attribution")


def test_aligner_step_matches_one_device(checks):
    _check(checks, "aligner")


def test_lora_step_matches_one_device(checks):
    _check(checks, "lora")


def test_train_aligner_with_mesh_matches_one_device(checks):
    """2 steps on 2x2x2, and 4x2 resumed on 2x2x2, save the aligner of the run without a mesh at every step;
    weights, aligner and gradients carry the rules' shardings while training; ``pktjax laten train --mesh``."""
    _check(checks, "train_aligner")


def test_lora_train_with_mesh_matches_one_device(checks):
    """2 LoRA steps on 2x2x2, and 4x2 resumed on 2x2x2, end with the adapter of the run without a mesh; the
    micro-batches are split over data x fsdp and the adapter follows the rules."""
    _check(checks, "lora_train")


def test_semalign_fit_with_mesh_matches_one_device(checks):
    """SemAlign's one-layer LoRA through the shared trainer: on 2x2x2, and 4x2 resumed on 2x2x2, the factors of
    the run without a mesh; the per-token targets travel split like the rest of the batch."""
    _check(checks, "semalign")


# ------------------------------------------------------------------------------------------- two processes

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_take_one_aligner_step(tmp_path):
    """Two local processes (2 CPU devices each, coordinator on 127.0.0.1) load a sharded pair, take one aligner
    step on the global 4-device mesh, save with orbax and restore on another mesh shape; same numbers as one
    process on one device."""
    from tests.sharding_checks import prepare_multiprocess, tree_close, tree_rel_close

    prepare_multiprocess(tmp_path)
    port = str(_free_port())
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # the two workers together, the reference after them
        workers = [pool.submit(_child, ["worker", port, str(i), str(tmp_path)], 2, WORKER_TIMEOUT_S) for i in (0, 1)]
        for proc in [w.result() for w in workers]:
            assert proc.returncode == 0, _report(proc)
    ref = _child(["reference", str(tmp_path)], None, WORKER_TIMEOUT_S)
    assert ref.returncode == 0, _report(ref)
    got, want = np.load(tmp_path / "multiprocess.npz"), np.load(tmp_path / "reference.npz")
    assert (tmp_path / "meta.json").read_text() == '{"processes": 2, "devices": 4}'
    for key in want.files:
        check = tree_rel_close if "/grads/" in key or "/mu/" in key or "/nu/" in key else tree_close
        check(got[key], want[key], key)
        if key.startswith("result/state/"):
            np.testing.assert_array_equal(got[key.replace("result/state/", "restored/")], got[key])
