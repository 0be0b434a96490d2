"""One weights dtype for every command and ``pktjax plan``; ``--dtype``/``--mesh`` reach the model loads;
``pktjax plan CONFIG``; ``pktjax transfer`` refuses a job that does not fit before it writes or loads anything."""

from __future__ import annotations

import inspect
import os
from importlib import resources

import jax
import jax.numpy as jnp
import pytest
import yaml

from pktjax import checkpoint, sharding
from pktjax import memory as P
from pktjax.cli import build_parser, main
from pktjax.errors import CheckpointError, ConfigError
from pktjax.lora_train import TrainConfig as LoraConfig
from pktjax.settings import DEFAULT_DTYPE, DeviceSettings
from pktjax.train_aligner import TrainConfig as AlignerConfig
from pktjax.transfer import read_config
from pktjax.transfer import stages

GIB = 1 << 30
LLAMA = {"teacher": "llama-2-13b", "student": "llama-2-7b", "task": "gsm", "mesh": "fsdp=4", "device_memory_gb": 32}


def _config(tmp_path, **kw):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({**LLAMA, "out": str(tmp_path / "run"), **kw}))
    return path


MODEL_COMMANDS = {  # argv of every command that loads a model (required options only)
    "eval": ["eval", "--model", "m", "--task", "mmlu"],
    "laten train": ["laten", "train", "--teacher", "t", "--student", "s", "--task", "gsm", "--out", "o"],
    "seeking extract": ["seeking", "extract", "--teacher", "t", "--student", "s", "--task", "gsm", "--out", "o"],
    "analyze": ["analyze", "--teacher", "t", "--student", "s", "--task", "gsm", "--out", "o"],
    "lora train": ["lora", "train", "--student", "s", "--task", "gsm", "--out", "o"],
    "lora merge": ["lora", "merge", "--student", "s", "--adapter", "a", "--out", "o"],
}


def test_one_default_dtype_everywhere():
    parser = build_parser()
    for name, argv in MODEL_COMMANDS.items():
        args = parser.parse_args(argv)
        assert args.dtype == DEFAULT_DTYPE, name
        assert getattr(args, "mesh", None) is None, name
    # these take theirs from a config or a training run, falling back to the same default
    for argv in (["transfer", "c.yaml"], ["plan", "c.yaml"],
                 ["laten", "fuse", "--teacher", "t", "--student", "s", "--task", "gsm", "--out", "o", "--aligner", "a",
                  "--step", "0"]):
        assert parser.parse_args(argv).dtype is None
    assert P.PlanInput.dtype == AlignerConfig.dtype == LoraConfig.dtype == DeviceSettings.dtype == DEFAULT_DTYPE
    assert inspect.signature(checkpoint.load_model).parameters["dtype"].default == jnp.dtype(DEFAULT_DTYPE)


def test_config_dtype_mesh_and_fingerprint(tmp_path):
    path = _config(tmp_path, lora={"seeds": [1]}, seeking={"seeds": [1], "teacher_dtype": "float32"})
    cfg = read_config(path)
    assert cfg.device == DeviceSettings(mesh="fsdp=4", dtype=DEFAULT_DTYPE, device_memory_gb=32.0)
    assert cfg.lora.dtype == cfg.seeking.dtype == DEFAULT_DTYPE
    bf = read_config(path, overrides=["mesh=data=2,fsdp=2,tensor=2", "dtype=bfloat16"])
    assert bf.device.mesh == "data=2,fsdp=2,tensor=2" and bf.device.dtype == "bfloat16"
    assert bf.lora.dtype == "bfloat16" and bf.seeking.dtype == "bfloat16"  # unset: the top-level dtype
    assert bf.seeking.teacher_dtype == "float32"  # set: kept
    assert bf.resolved()["dtype"] == "bfloat16" and bf.resolved()["lora"]["dtype"] == "bfloat16"
    # a run resumes on another mesh or device memory, not in another dtype; a config that names the default dtype
    # is the same run
    assert read_config(path, overrides=["mesh=fsdp=8", "device_memory_gb=80"]).fingerprint() == cfg.fingerprint()
    assert cfg.fingerprint() != bf.fingerprint()
    assert read_config(_config(tmp_path, dtype="float32", lora={"seeds": [1]},
                               seeking={"seeds": [1], "teacher_dtype": "float32"})).fingerprint() == cfg.fingerprint()
    for bad, match in (({"dtype": "float16"}, "dtype = 'float16'"), ({"mesh": "model=4"}, "mesh 'model=4'"),
                       ({"device_memory_gb": -1}, "device_memory_gb = -1")):
        with pytest.raises(ConfigError, match=match):
            read_config(_config(tmp_path, **bad))


def test_plan_reads_a_transfer_config(tmp_path, capsys):
    """Llama-2 13B -> 7B on a v4-8 (fsdp=4, 32 GiB): float32 weights (the default) do not fit, bfloat16 ones do."""
    path = _config(tmp_path)
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "float32 weights, mesh fsdp=4 (4 devices x 32 GiB)" in out
    # each device holds a quarter of the float32 teacher, except the norms (2 per layer + the final one), which
    # are replicated: 13,015,864,320 parameters
    norms = (2 * 40 + 1) * 5120
    teacher = ((13_015_864_320 - norms) / 4 + norms) * 4
    assert f"| held | teacher weights | {teacher / GIB:8.2f} |" in out
    assert "DOES NOT FIT: peak 36.3 GiB of 28.8 GiB usable" in out and "it fits with --dtype bfloat16" in out
    assert main(["plan", str(path), "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert f"| held | teacher weights | {teacher / 2 / GIB:8.2f} |" in out and "FITS: peak 21.1 GiB" in out
    assert main(["plan", str(path), "--teacher", "llama-2-13b"]) == 2  # a config or the two models, not both
    assert "either a transfer config" in capsys.readouterr().err


def test_transfer_refuses_a_job_that_does_not_fit(tmp_path, capsys, monkeypatch):
    """Refused with the plan's numbers and the dtype that fits, before the output folder or any model exists."""
    loads = []
    for module in (checkpoint, stages):
        monkeypatch.setattr(module, "load_model", lambda *a, **k: loads.append(a))
    # the presets' shapes as checkpoint folders without weights (a job never gets as far as loading them)
    for name in ("llama-2-13b", "llama-2-7b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(resources.files("pktjax.presets").joinpath(f"{name}.json")
                                                     .read_text())
    path = _config(tmp_path, mesh=None, teacher=str(tmp_path / "llama-2-13b"), student=str(tmp_path / "llama-2-7b"))
    assert main(["transfer", str(path)]) == 2  # one device (the test's process has one)
    err = capsys.readouterr().err
    assert "does not fit its devices" in err and "float32 weights, mesh fsdp=1 (1 device x 32 GiB)" in err
    assert "DOES NOT FIT: peak" in err and "`dtype:`" in err
    assert not (tmp_path / "run").exists() and not loads
    # no device_memory_gb: a CPU device reports no limit and gets its share of the host's memory
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB / len(jax.local_devices())
    unset = _config(tmp_path, mesh=None, device_memory_gb=None, teacher=str(tmp_path / "llama-2-13b"),
                    student=str(tmp_path / "llama-2-7b"))
    assert main(["transfer", str(unset)]) == 2
    err = capsys.readouterr().err
    assert f"mesh fsdp=1 (1 device x {host:g} GiB)" in err and "DOES NOT FIT: peak" in err
    assert not (tmp_path / "run").exists() and not loads
    # a tiny pair on a device of a few MiB: the same refusal
    tiny = _config(tmp_path, mesh=None, device_memory_gb=0.001, teacher="tiny:hidden=64,layers=4,inter=128,heads=4",
                   student="tiny:hidden=32,layers=2,inter=64,heads=4")
    assert main(["transfer", str(tiny)]) == 2
    assert "does not fit its devices" in capsys.readouterr().err and not (tmp_path / "run").exists()
    # a mesh of more devices than there are, also before anything is written
    assert main(["transfer", str(path), "--mesh", "fsdp=2"]) == 2
    assert "multiply to 2 but 1 devices" in capsys.readouterr().err and not (tmp_path / "run").exists()


class _Loaded(CheckpointError):
    pass


def test_dtype_and_mesh_reach_every_model_load(tmp_path, monkeypatch):
    """``--dtype bfloat16 --mesh fsdp=1`` on each command: its first model load gets bfloat16 and a 1-device mesh."""
    import importlib

    from pktjax.tiny import save_random_model, tiny_config

    teacher = save_random_model(tmp_path / "t", tiny_config(hidden=64, layers=3, inter=96, heads=4), 1)
    student = save_random_model(tmp_path / "s", tiny_config(hidden=32, layers=2, inter=64, heads=4), 2)
    seen = []

    def load(path, dtype=jnp.float32, mesh=None):
        seen.append((jnp.dtype(dtype), None if mesh is None else dict(mesh.shape)))
        raise _Loaded("loaded")

    for module in ("pktjax.checkpoint", "pktjax.train_aligner", "pktjax.workflows"):
        monkeypatch.setattr(importlib.import_module(module), "load_model", load)
    t, s, out = str(teacher), str(student), str(tmp_path / "out")
    real = {"eval": ["eval", "--model", s, "--task", "mmlu"],
            "laten train": ["laten", "train", "--teacher", t, "--student", s, "--task", "gsm", "--out", out],
            "seeking extract": ["seeking", "extract", "--teacher", t, "--student", s, "--task", "gsm", "--out", out],
            "analyze": ["analyze", "--teacher", t, "--student", s, "--task", "gsm", "--out", out],
            "lora train": ["lora", "train", "--student", s, "--task", "gsm", "--out", out]}
    assert set(real) == set(MODEL_COMMANDS) - {"lora merge"}  # lora merge: no mesh; its --dtype is the saved one
    for name, argv in real.items():
        seen.clear()
        assert main([*argv, "--dtype", "bfloat16", "--mesh", "fsdp=1"]) == 2, name
        assert seen[:1] == [(jnp.dtype("bfloat16"), {"data": 1, "fsdp": 1, "tensor": 1})], (name, seen)
    assert sharding.is_main_process()
