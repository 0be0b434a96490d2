"""Generation speed: pktjax's KV-cache decoding against ``transformers`` greedy ``generate`` on the same CPU.

Two random models are written as Hugging Face checkpoints: a tiny one (d=32, 2 layers, vocab 260) and a
mid-size one (d=512, 8 layers, f=1408, vocab 32000). Both libraries decode the same prompts greedily for a fixed
number of new tokens (the checkpoints have no EOS token), after one warm-up run (compilation for pktjax).
Reported: new tokens per second (batch x new tokens / wall time) and whether the two token streams agree.

    JAX_PLATFORMS=cpu .venv/bin/python experiments/bench_generate.py [--batch 1 8] [--prompt 64] [--new 128]

With ``--gguf FILE`` it measures a real model instead, on HumanEval prompts with the task's stop strings, greedy:
the load (dequantization, or the cached copy), pktjax's continuous batching (cold with compiles, then warm, twice,
around one run of transformers' ``generate`` on the same prompts and weights so that the ratio sees the same
machine load), prefill / decode / host seconds, slot occupancy, the decode step against its floors (one pass over
the weights; the step's matrix products alone; float32 and bfloat16), and a linear estimate of a full HumanEval
pass (164 prompts) including the load.

    .venv/bin/python experiments/bench_generate.py --gguf ~/.cache/pktjax/qwen2.5-coder-0.5b-instruct-q4.gguf \
        --prompts 8 --new 384 --slots 8 [--no-torch] [--json out.json]

``--matmul-dtype bfloat16`` has pktjax multiply by bfloat16 copies of the weight matrices (what ``pktjax eval
--matmul-dtype`` does; converted once, before the runs), ``--torch-dtype bfloat16`` loads transformers' model in
bfloat16: each library at its fastest on a CPU with bfloat16 units, against both at float32 by default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

SIZES = {
    "tiny": dict(hidden=32, layers=2, inter=48, heads=4, vocab=260),
    "mid": dict(hidden=512, layers=8, inter=1408, heads=8, vocab=32000),
}


def _prompts(batch: int, length: int, vocab: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``ids, mask [batch, length]``: random tokens; row i is left-padded by ``i`` tokens."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(4, vocab, size=(batch, length)).astype(np.int32)
    mask = np.ones_like(ids)
    for i in range(batch):
        mask[i, :min(i, length - 1)] = 0
    ids[mask == 0] = 3
    return ids, mask


def _time_pktjax(model, ids, mask, new: int) -> tuple[float, np.ndarray]:
    from pktjax.generate import generate

    generate(model.params, model.config, ids, mask, new, eos_ids=(), pad_id=3)  # compile
    t = time.perf_counter()
    out = generate(model.params, model.config, ids, mask, new, eos_ids=(), pad_id=3)
    return time.perf_counter() - t, out.tokens


def _time_torch(folder: Path, ids, mask, new: int) -> tuple[float, np.ndarray]:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    gc = GenerationConfig(max_new_tokens=new, do_sample=False, pad_token_id=3, eos_token_id=None)
    ti, tm = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
    with torch.no_grad():
        model.generate(input_ids=ti, attention_mask=tm, generation_config=gc)  # warm-up
        t = time.perf_counter()
        out = model.generate(input_ids=ti, attention_mask=tm, generation_config=gc)
    return time.perf_counter() - t, out[:, ids.shape[1]:].numpy()


def run(batches: list[int], prompt: int, new: int) -> list[dict]:
    import torch

    from pktjax.checkpoint import load_model
    from pktjax.tiny import save_random_model, tiny_config

    rows = []
    for name, kw in SIZES.items():
        folder = Path(tempfile.mkdtemp(prefix=f"bench-{name}-")) / "model"
        cfg = tiny_config(hidden=kw["hidden"], layers=kw["layers"], inter=kw["inter"], heads=kw["heads"],
                          vocab=kw["vocab"])
        cfg = dataclasses.replace(cfg, eos_token_id=None)  # no EOS: both libraries decode every token
        save_random_model(folder, cfg, seed=0)
        model = load_model(folder)
        for b in batches:
            ids, mask = _prompts(b, prompt, kw["vocab"])
            tj, out_j = _time_pktjax(model, ids, mask, new)
            tt, out_t = _time_torch(folder, ids, mask, new)
            rows.append({"model": name, "batch": b, "prompt": prompt, "new": new,
                         "pktjax_tok_s": b * new / tj, "torch_tok_s": b * new / tt,
                         "speedup": tt / tj, "same_tokens": bool((out_j == out_t).all()),
                         "torch_threads": torch.get_num_threads(), "jax_device": str(jax.devices()[0])})
            print(json.dumps(rows[-1]), flush=True)
    return rows


# ------------------------------------------------------------------------------------------------ real model

def _timed(fn, *a, **kw):
    t = time.perf_counter()
    out = fn(*a, **kw)
    return time.perf_counter() - t, out


def _pktjax_run(model, tok, prompts, new, slots, stop) -> dict:
    from pktjax.generate import generate_text

    stats: dict = {}
    wall, gen = _timed(generate_text, model.params, model.config, tok, prompts, new, stop=stop, slots=slots,
                       stats=stats)
    return {"wall_s": wall, "tokens": int(gen.lengths.sum()), "texts": gen.texts, **stats}


def _torch_run(folder: Path, tok, prompts, new, stop, dtype: str = "float32") -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    tok.padding_side = "left"
    enc = tok(list(prompts), return_tensors="pt", padding=True)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with torch.no_grad():
        t = time.perf_counter()
        out = model.generate(**enc, max_new_tokens=new, do_sample=False, stop_strings=list(stop), tokenizer=tok,
                             pad_token_id=pad)
        wall = time.perf_counter() - t
    texts = []
    for row in out[:, enc["input_ids"].shape[1]:].tolist():
        text = tok.decode(row, skip_special_tokens=True)
        cut = [i for i in (text.find(s) for s in stop) if i >= 0]
        texts.append(text[:min(cut)] if cut else text)
    return {"wall_s": wall, "texts": texts, "threads": torch.get_num_threads()}


def _floors(model, slots: int, reps: int = 3) -> dict:
    """Best wall seconds of one pass over the matrices the decode step multiplies by, and of the step's matrix
    products alone at batch ``slots``, with float32 matrices and with the decoder's bfloat16 copies
    (``experiments/bench_decode_step.py``'s floors)."""
    import jax.numpy as jnp

    from experiments.bench_decode_step import _floors as step_floors

    out = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        f, name = step_floors(model.params, model.config, slots, reps, dtype), jnp.dtype(dtype).name
        out[f"stream_{name}_s"], out[f"matmul_{name}_s"] = f["stream_wall_s"], f["matmul_wall_s"]
    return out


def run_gguf(path: Path, n_prompts: int, new: int, slots: int, with_torch: bool, matmul_dtype: str | None = None,
             torch_dtype: str = "float32") -> dict:
    import platform

    from pktjax.checkpoint import copy_tokenizer, load_model, save_model
    from pktjax.gguf_io import gguf_cache_key
    from pktjax.model import with_matmul_dtype
    from pktjax.registry import home
    from pktjax.tasks import get_task
    from pktjax.tokenizer import load_tokenizer

    cached = any((home() / "dequantized").glob(f"{path.stem}-{gguf_cache_key(path)}/model.safetensors"))
    load_s, model = _timed(load_model, path)
    tok = load_tokenizer(path)
    task = get_task("humaneval")
    examples = task.load(n_prompts)
    prompts = [task.prompt(ex, []) for ex in examples]
    tokenize_s, ids = _timed(lambda: [tok(p)["input_ids"] for p in prompts])
    stop = list(task.STOP)
    res = {"gguf": str(path), "prompts": len(prompts), "new": new, "slots": slots, "load_s": load_s,
           "load_from_cache": cached, "tokenize_s": tokenize_s, "prompt_tokens": [len(x) for x in ids],
           "machine": f"{platform.machine()}, {os.cpu_count()} cores", "jax_device": str(jax.devices()[0]),
           "matmul_dtype": matmul_dtype or "float32", "torch_dtype": torch_dtype}
    print(json.dumps({k: v for k, v in res.items() if k != "prompt_tokens"}), flush=True)
    fast = model if matmul_dtype is None else model.replace(params=with_matmul_dtype(model.params, matmul_dtype))
    runs = {"pktjax_cold": _pktjax_run(fast, tok, prompts, new, slots, stop)}
    runs["pktjax_warm1"] = _pktjax_run(fast, tok, prompts, new, slots, stop)
    _show(runs)
    from pktjax import sandbox

    programs = [task.program(ex, out) for ex, out in zip(examples, runs["pktjax_warm1"]["texts"])]
    res["sandbox_s"], results = _timed(sandbox.run_many, programs)
    res["passed"] = sum(r.ok for r in results)
    if with_torch:
        folder = Path(tempfile.mkdtemp(prefix="bench-hf-")) / "model"
        res["hf_export_s"] = _timed(save_model, model, folder)[0]
        copy_tokenizer(str(path), folder)
        runs["torch"] = _torch_run(folder, load_tokenizer(folder), prompts, new, stop, torch_dtype)
        _show(runs)
        runs["pktjax_warm2"] = _pktjax_run(fast, tok, prompts, new, slots, stop)
        _show(runs)
    warm = [runs[k] for k in ("pktjax_warm1", "pktjax_warm2") if k in runs]
    tokens = warm[0]["tokens"]
    pk_wall = sum(r["wall_s"] for r in warm) / len(warm)
    res.update(useful_tokens=tokens, pktjax_wall_s=pk_wall, pktjax_tok_s=tokens / pk_wall,
               compile_s=runs["pktjax_cold"]["wall_s"] - warm[0]["wall_s"],
               decode_step_s=warm[0]["decode_s"] / max(1, warm[0]["decode_steps"]),
               **{k: warm[0][k] for k in ("prefill_s", "decode_s", "host_s", "decode_steps", "occupancy")})
    if "torch" in runs:
        res.update(torch_wall_s=runs["torch"]["wall_s"], torch_tok_s=tokens / runs["torch"]["wall_s"],
                   speedup=runs["torch"]["wall_s"] / pk_wall, torch_threads=runs["torch"]["threads"],
                   same_texts=sum(a == b for a, b in zip(runs["torch"]["texts"], warm[0]["texts"])))
    res.update(_floors(model, slots))
    res["full_humaneval_estimate_s"] = load_s + res["compile_s"] + (pk_wall + res["sandbox_s"]) * 164 / len(prompts)
    res["runs"] = {k: {kk: vv for kk, vv in v.items() if kk != "texts"} for k, v in runs.items()}
    return res


def _show(runs: dict) -> None:
    name, r = list(runs.items())[-1]
    print(json.dumps({"run": name, **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()
                                      if k != "texts"}}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--gguf", type=Path, help="a real model: HumanEval prompts, stop strings, greedy")
    ap.add_argument("--prompts", type=int, default=8, help="--gguf: HumanEval prompts")
    ap.add_argument("--slots", type=int, default=8, help="--gguf: pktjax decode slots")
    ap.add_argument("--no-torch", action="store_true", help="--gguf: skip transformers")
    ap.add_argument("--json", type=Path, help="--gguf: write the figures there")
    ap.add_argument("--matmul-dtype", choices=["bfloat16"], help="--gguf: pktjax's weight matrices in this dtype")
    ap.add_argument("--torch-dtype", choices=["float32", "bfloat16"], default="float32",
                    help="--gguf: transformers' model in this dtype")
    args = ap.parse_args()
    if args.gguf is not None:
        res = run_gguf(args.gguf.expanduser(), args.prompts, args.new, args.slots, not args.no_torch,
                       args.matmul_dtype, args.torch_dtype)
        print(json.dumps({k: v for k, v in res.items() if k != "runs"}, indent=1))
        if args.json:
            args.json.write_text(json.dumps(res, indent=1))
        return
    rows = run(args.batch, args.prompt, args.new)
    print(f"\n{'model':6} {'batch':>5} {'pktjax tok/s':>13} {'torch tok/s':>12} {'speedup':>8} {'same':>5}")
    for r in rows:
        print(f"{r['model']:6} {r['batch']:5d} {r['pktjax_tok_s']:13.1f} {r['torch_tok_s']:12.1f} "
              f"{r['speedup']:8.2f} {str(r['same_tokens']):>5}")


if __name__ == "__main__":
    main()
