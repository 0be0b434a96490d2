"""Generation speed: pktjax's KV-cache decoding against ``transformers`` greedy ``generate`` on the same CPU.

Two random models are written as Hugging Face checkpoints: a tiny one (d=32, 2 layers, vocab 260) and a
mid-size one (d=512, 8 layers, f=1408, vocab 32000). Both libraries decode the same prompts greedily for a fixed
number of new tokens (the checkpoints have no EOS token), after one warm-up run (compilation for pktjax).
Reported: new tokens per second (batch x new tokens / wall time) and whether the two token streams agree.

    JAX_PLATFORMS=cpu .venv/bin/python experiments/bench_generate.py [--batch 1 8] [--prompt 64] [--new 128]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    args = ap.parse_args()
    rows = run(args.batch, args.prompt, args.new)
    print(f"\n{'model':6} {'batch':>5} {'pktjax tok/s':>13} {'torch tok/s':>12} {'speedup':>8} {'same':>5}")
    for r in rows:
        print(f"{r['model']:6} {r['batch']:5d} {r['pktjax_tok_s']:13.1f} {r['torch_tok_s']:12.1f} "
              f"{r['speedup']:8.2f} {str(r['same_tokens']):>5}")


if __name__ == "__main__":
    main()
