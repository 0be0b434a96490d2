"""The lm-evaluation-harness model ``pktjax`` against lm-eval's own Hugging Face backend on the same tiny
checkpoint: a local multiple-choice YAML task through ``simple_evaluate`` (accuracy and every log-likelihood),
``loglikelihood_rolling`` and ``generate_until``."""

import json

import pytest

lm_eval = pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from pktjax.lm_eval_model import PktjaxLM  # noqa: E402

# float32 logits of a 2-layer model in JAX and in PyTorch differ by ~1e-6 per token; summed over a few tokens
# (and through log-softmax over a small vocabulary) the log-likelihoods agree far inside 1e-4
TOL = 1e-4


def _task(folder):
    docs = [{"question": q, "choices": c, "answer": a} for q, c, a in [
        ("The sky is", ["blue", "green", "loud"], 0), ("Two plus two is", ["four", "five"], 0),
        ("Water is", ["wet", "dry", "square", "late"], 0), ("Cats say", ["meow", "moo"], 0)]]
    (folder / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'docs.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n")
    return TaskManager(include_path=str(folder), include_defaults=False)  # no scan of lm-eval's own tasks


def test_pktjax_matches_the_hf_backend_on_a_local_task(tiny_dir, tmp_path):
    folder = tiny_dir("llama2")
    ours_lm = PktjaxLM(str(folder), batch_size=4)
    hf_lm = HFLM(pretrained=str(folder), dtype="float32", batch_size=4, device="cpu")
    runs = [simple_evaluate(model=lm, tasks=["tiny_mc"], task_manager=_task(tmp_path), log_samples=True,
                            bootstrap_iters=0) for lm in (ours_lm, hf_lm)]
    ours, theirs = ([s["filtered_resps"] for s in r["samples"]["tiny_mc"]] for r in runs)
    assert len(ours) == 4
    for a, b in zip(ours, theirs):
        assert [x[0] for x in a] == pytest.approx([x[0] for x in b], abs=TOL)
    assert runs[0]["results"]["tiny_mc"]["acc,none"] == runs[1]["results"]["tiny_mc"]["acc,none"]

    text = "Water is wet, and the sky is blue on a clear day."
    rolling = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    assert ours_lm.loglikelihood_rolling(rolling) == pytest.approx(hf_lm.loglikelihood_rolling(rolling), abs=TOL)
    assert lm_eval.api.registry.get_model("pktjax") is PktjaxLM
    gen = [Instance("generate_until", {}, ("The sky is", {"until": ["\n\n"], "max_gen_toks": 6, "do_sample": False}),
                    0)]
    assert ours_lm.generate_until(gen) == hf_lm.generate_until(gen)


def _mesh_child(folder: str) -> None:
    """In a process with 2 CPU devices: the model sharded by ``mesh`` (fsdp, then tensor, the second through
    lm-eval's model_args) gives the one-device model's log-likelihoods, argmax flags and greedy completions."""
    import jax
    import numpy as np

    assert jax.device_count() == 2
    one = PktjaxLM(folder, batch_size=3)
    reqs = [Instance("loglikelihood", {}, (ctx, cont), i) for i, (ctx, cont) in enumerate(
        [("The sky is", " blue"), ("Two plus two is", " four"), ("Water", " is wet and cold"), ("", "Cats")])]
    text = [Instance("loglikelihood_rolling", {}, ("Water is wet, and the sky is blue on a clear day.",), 0)]
    gen = [Instance("generate_until", {}, (p, {"until": ["\n\n"], "max_gen_toks": 6}), i)
           for i, p in enumerate(["The sky is", "Cats say"])]
    want = one.loglikelihood(reqs), one.loglikelihood_rolling(text), one.generate_until(gen)
    sharded = [PktjaxLM(folder, batch_size=3, mesh="fsdp=2"),
               lm_eval.api.registry.get_model("pktjax").create_from_arg_string(
                   f"pretrained={folder},batch_size=3,mesh=data=1;tensor=2")]
    for lm, axis in zip(sharded, ("fsdp", "tensor")):
        spread = [x for x in jax.tree.leaves(lm.model.params) if len(x.sharding.device_set) == 2 and
                  not x.sharding.is_fully_replicated]
        assert spread and dict(lm.model.params["embed"].sharding.mesh.shape)[axis] == 2, axis
        ll = lm.loglikelihood(reqs)
        # float32 sums over a vocabulary split across devices add in another order (~1e-6 per logit)
        assert np.allclose([x[0] for x in ll], [x[0] for x in want[0]], atol=TOL, rtol=0), (axis, ll, want[0])
        assert [x[1] for x in ll] == [x[1] for x in want[0]]
        assert np.allclose(lm.loglikelihood_rolling(text), want[1], atol=TOL, rtol=0)
        assert lm.generate_until(gen) == want[2]
    print("lm_eval mesh ok")


def test_pktjax_on_a_two_device_mesh_matches_one_device(tiny_dir):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(root),
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}  # fixed when jax starts: a child process
    code = f"from tests.test_lm_eval import _mesh_child; _mesh_child({str(tiny_dir('llama2'))!r})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "lm_eval mesh ok" in proc.stdout, proc.stderr[-4000:]
