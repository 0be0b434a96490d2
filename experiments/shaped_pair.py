"""A random-weight stand-in for a real checkpoint: the same config (shapes, vocabulary, RoPE, tying) and the same
tokenizer, with N(0, std^2) matrices. Used to time the whole `pktjax transfer` job at a real pair's sizes on a
machine that cannot receive the real weights (a lent accelerator takes at most 64 MiB of files).

    # here, where the pair is installed: config + tokenizer only (a few MB, carried to the other machine)
    python -m experiments.shaped_pair ~/.cache/pktjax/qwen2.5-coder-1.5b-instruct-q4.gguf .devdata/shapes/teacher
    # there: the same folder filled with random weights
    python -m experiments.shaped_pair .devdata/shapes/teacher runs/shapes/teacher --weights --seed 1

Scores of such models mean nothing (they never emit an end token, so every completion runs to the token limit:
the times are upper bounds for the real weights).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT_STD = 0.02


def write_shapes(src: str, dst: str, weights: bool = False, seed: int = 0, std: float = DEFAULT_STD) -> Path:
    """Write ``src``'s config and tokenizer into ``dst``; with ``weights``, random weights too (atomically)."""
    import jax

    from pktjax.checkpoint import Model, copy_tokenizer, read_model_config, save_model
    from pktjax.tiny import random_params

    cfg, dst_path = read_model_config(src), Path(dst).expanduser()
    if weights:  # save_model copies src's tokenizer along, inside its atomic write
        save_model(Model(params=random_params(cfg, jax.random.key(seed), std), config=cfg, source=str(src)), dst_path)
    else:
        dst_path.mkdir(parents=True, exist_ok=True)
        copy_tokenizer(str(src), dst_path)
        (dst_path / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2))
    return dst_path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="a checkpoint folder or .gguf file (its weights are not read)")
    ap.add_argument("dst", help="the folder to write")
    ap.add_argument("--weights", action="store_true", help="also write random weights (float32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--std", type=float, default=DEFAULT_STD, help="matrix entries' standard deviation")
    a = ap.parse_args(argv)
    print(write_shapes(a.src, a.dst, a.weights, a.seed, a.std))


if __name__ == "__main__":
    main()
