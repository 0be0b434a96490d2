"""Autoregressive decoding with the KV cache of :func:`pktjax.model.forward_cached`.

Prompts are left-padded into one batch. Batch size, prompt length and the number of new tokens are rounded up
to buckets, so a jitted prefill and a jitted decode loop are compiled once per bucket and reused for every
later batch that falls into it. The decode loop is a ``lax.while_loop`` that runs until every row has stopped or
a step budget is used up; with stop strings it runs in chunks of steps, and the host decodes the new text between
chunks to mark rows whose text contains a stop string.

The prefill projects only the last prompt position onto the vocabulary. Greedy decoding is compiled without a
random number generator; sampling (``temperature > 0``) has its own programs.

``use_cache=False`` is a slow reference path that recomputes the whole sequence with :func:`pktjax.model.forward`
at every step (one compile for the whole loop); the tests use it to check the cached path.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pktjax.config import ModelConfig
from pktjax.model import (_run_layers, attention_mask_bias, embed, forward, forward_cached, init_cache, rope_cos_sin,
                          unembed)

Params = dict


@dataclass(frozen=True)
class Generation:
    """What :func:`generate` returns. ``B`` = number of prompts, ``N`` = ``max_new_tokens``.

    tokens  [B, N] int32: the new tokens; after a row's end every slot holds ``pad_id``.
    lengths [B]    int:   tokens kept per row (an EOS that ended the row counts; tokens past a stop string do not).
    finish  list of ``"eos" | "stop" | "length"`` per row.
    texts   the decoded new text per row, cut before the first stop string (only when a tokenizer is given).
    """

    tokens: np.ndarray
    lengths: np.ndarray
    finish: list[str]
    texts: list[str] | None = None


# ----------------------------------------------------------------------------------------------- shape buckets

def round_batch(b: int) -> int:
    """Batch bucket: 1, 2, 4, 8, then multiples of 8."""
    if b <= 8:
        return 1 << max(0, (b - 1).bit_length())
    return -(-b // 8) * 8


def round_length(n: int) -> int:
    """Prompt-length bucket: multiples of 64 up to 512, then multiples of 256."""
    step = 64 if n <= 512 else 256
    return max(step, -(-n // step) * step)


def _round_new(n: int) -> int:
    return max(16, -(-n // 64) * 64) if n > 16 else 16


# ----------------------------------------------------------------------------------------------- token choice

def _choose(logits: jax.Array, temperature: jax.Array, key: jax.Array, step: jax.Array, top_k: int,
            sample: bool) -> jax.Array:
    """Next token per row from ``logits [B, V]``: argmax, or (``sample``) a draw at ``temperature``, among the
    ``top_k`` best tokens when ``top_k > 0``.

    Each row draws with its own key ``fold_in(fold_in(key, step), row)``, so a row's sample does not depend on
    the batch bucket it was padded into. Greedy programs contain no random number generator (it is costly to
    compile on CPU), so greedy and sampled decoding are compiled separately.
    """
    if not sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / temperature
    if top_k > 0:
        kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]
        scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    step_key = jax.random.fold_in(key, step)
    keys = jax.vmap(lambda r: jax.random.fold_in(step_key, r))(jnp.arange(logits.shape[0]))
    return jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)


def _record(state: dict, token: jax.Array, eos: jax.Array, pad_id: jax.Array) -> dict:
    """Write ``token [B]`` at column ``state['step']`` (``pad_id`` for finished rows) and advance."""
    token = jnp.where(state["done"], pad_id, token)
    out = jax.lax.dynamic_update_slice(state["out"], token[:, None], (0, state["step"]))
    done = state["done"] | jnp.any(token[:, None] == eos[None, :], axis=-1)
    return {**state, "out": out, "done": done, "tok": token, "step": state["step"] + 1}


# ----------------------------------------------------------------------------------------------- cached path

@partial(jax.jit, static_argnames=("cfg", "n_new", "top_k", "sample"))
def _prefill(params: Params, cfg: ModelConfig, ids: jax.Array, mask: jax.Array, done: jax.Array, eos: jax.Array,
             pad_id: jax.Array, temperature: jax.Array, key: jax.Array, *, n_new: int, top_k: int,
             sample: bool) -> dict:
    """Run the prompt ``ids, mask [B, P]`` through the cache and pick the first new token.

    Returns the decode state: cache (``max_len = P + n_new``), ``key_mask [B, max_len]``, ``out [B, n_new]``,
    ``tok, pos [B]``, ``done [B]``, ``step`` (tokens written so far) and the sampling key.
    """
    b, p = ids.shape
    cache = init_cache(cfg, b, p + n_new, params["embed"].dtype)
    key_mask = jnp.concatenate([mask, jnp.ones((b, n_new), mask.dtype)], axis=1)
    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
    logits, cache = _prefill_last_logits(params, cfg, ids, positions, key_mask, cache)
    state = {"cache": cache, "key_mask": key_mask, "out": jnp.zeros((b, n_new), jnp.int32), "done": done,
             "tok": jnp.zeros((b,), jnp.int32), "pos": positions[:, -1] + 1, "step": jnp.zeros((), jnp.int32),
             "key": key}
    first = _choose(logits[:, -1], temperature, key, state["step"], top_k, sample)
    return _record(state, first, eos, pad_id)


def _prefill_last_logits(params: Params, cfg: ModelConfig, ids: jax.Array, positions: jax.Array,
                         key_mask: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    """:func:`pktjax.model.forward_cached` for a whole prompt, but with the vocabulary projection of the last
    position only: ``logits [B, 1, V]`` instead of ``[B, P, V]`` (for a 128k vocabulary and long prompts the
    full tensor costs gigabytes, and XLA does not slice it away)."""
    cos, sin = rope_cos_sin(cfg, positions)
    bias = attention_mask_bias(cfg, cache["index"] + jnp.arange(ids.shape[1]), key_mask)
    x, _, kv = _run_layers(params, cfg, embed(params, ids), cos, sin, bias, capture=False, cache=cache)
    logits = unembed(params, cfg, x[:, -1:])
    return logits, {"k": kv["k"], "v": kv["v"], "index": cache["index"] + ids.shape[1]}


@partial(jax.jit, static_argnames=("cfg", "top_k", "sample"), donate_argnames=("state",))
def _decode(params: Params, cfg: ModelConfig, state: dict, until: jax.Array, eos: jax.Array, pad_id: jax.Array,
            temperature: jax.Array, *, top_k: int, sample: bool) -> dict:
    """Decode one token per step while ``step < until`` and some row is still running."""

    def cond(s):
        return (s["step"] < until) & ~jnp.all(s["done"])

    def body(s):
        logits, cache = forward_cached(params, cfg, s["tok"][:, None], s["pos"][:, None], s["key_mask"], s["cache"])
        nxt = _choose(logits[:, -1], temperature, s["key"], s["step"], top_k, sample)
        return _record({**s, "cache": cache, "pos": s["pos"] + 1}, nxt, eos, pad_id)

    return jax.lax.while_loop(cond, body, state)


# ----------------------------------------------------------------------------------------------- reference path

@partial(jax.jit, static_argnames=("cfg",))
def _full_logits_at(params: Params, cfg: ModelConfig, ids: jax.Array, mask: jax.Array, col: jax.Array) -> jax.Array:
    """Logits ``[B, V]`` at column ``col`` of a full (uncached) forward over ``ids, mask [B, S]``."""
    hidden = forward(params, cfg, ids, mask, return_hidden=True)
    return unembed(params, cfg, jax.lax.dynamic_index_in_dim(hidden, col, axis=1, keepdims=False))


_choose_jit = jax.jit(_choose, static_argnames=("top_k", "sample"))


def _reference_loop(params, cfg, ids, mask, done, eos, pad_id, temperature, key, n_new, steps, top_k, sample):
    """No-cache decoding: ``steps`` full forward passes over a fixed ``[B, P + n_new]`` buffer (one compile)."""
    b, p = ids.shape
    buf = np.concatenate([ids, np.full((b, n_new), int(pad_id), np.int32)], axis=1)
    buf_mask = np.concatenate([mask, np.zeros((b, n_new), np.int32)], axis=1)
    out = np.zeros((b, n_new), np.int32)
    done = np.array(done)
    eos_set = set(int(e) for e in np.asarray(eos) if e >= 0)
    for step in range(steps):
        if done.all():
            out[:, step:] = int(pad_id)
            break
        logits = _full_logits_at(params, cfg, jnp.asarray(buf), jnp.asarray(buf_mask), jnp.int32(p + step - 1))
        tok = np.asarray(_choose_jit(logits, temperature, key, jnp.int32(step), top_k=top_k, sample=sample))
        tok = np.where(done, int(pad_id), tok)
        out[:, step] = tok
        buf[:, p + step], buf_mask[:, p + step] = tok, 1
        done |= np.isin(tok, list(eos_set))
    return out


# ----------------------------------------------------------------------------------------------- public API

def generate(params: Params, cfg: ModelConfig, input_ids, attention_mask, max_new_tokens: int,
             stop: Sequence[str] = (), eos_ids: Sequence[int] | None = None, temperature: float = 0.0,
             key: jax.Array | None = None, *, tokenizer=None, top_k: int = 0, pad_id: int | None = None,
             use_cache: bool = True, chunk: int = 32) -> Generation:
    """Greedy (``temperature == 0``) or sampled decoding of up to ``max_new_tokens`` tokens per prompt.

    ``input_ids, attention_mask [B, T]``: left-padded prompts (mask 0 on padding). A row stops at its first token
    in ``eos_ids`` (default: the config's EOS ids; ``()`` never stops on EOS) or once its decoded text contains a
    string of ``stop`` (needs ``tokenizer``; the text is checked every ``chunk`` steps and cut before the stop
    string). Sampling needs ``key`` and is reproducible with it; ``top_k > 0`` samples among the k best tokens.
    Returns a :class:`Generation` (``tokens [B, max_new_tokens]``, ``lengths``, ``finish``, ``texts``).
    """
    ids, mask = _check_inputs(input_ids, attention_mask, max_new_tokens)
    stop = [s for s in ([stop] if isinstance(stop, str) else list(stop)) if s]
    if stop and tokenizer is None:
        raise ValueError("generate: stop strings need a tokenizer to decode the new text (pass tokenizer=...).")
    greedy = float(temperature) <= 0.0
    if not greedy and key is None:
        raise ValueError("generate: sampling (temperature > 0) needs a PRNG key, e.g. key=jax.random.key(0).")
    eos = tuple(cfg.eos_ids if eos_ids is None else eos_ids)
    pad = int(pad_id if pad_id is not None else (eos[0] if eos else 0))
    b = ids.shape[0]
    ids_b, mask_b, done_b = _pad_to_buckets(ids, mask, pad)
    n_new = _round_new(max_new_tokens)
    consts = dict(eos=_eos_array(eos), pad_id=jnp.int32(pad), temperature=jnp.float32(max(temperature, 1e-6)))
    key = key if key is not None else jax.random.key(0)
    if use_cache:
        out = _run_cached(params, cfg, ids_b, mask_b, done_b, key, n_new, max_new_tokens, stop, tokenizer, chunk,
                          top_k, not greedy, consts, b)
    else:
        out = _reference_loop(params, cfg, ids_b, mask_b, done_b, consts["eos"], consts["pad_id"],
                              consts["temperature"], key, n_new, max_new_tokens, top_k, not greedy)
    return _finish(out[:b, :max_new_tokens], ids[:, -8:], mask[:, -8:], eos, pad, stop, tokenizer)


def _check_inputs(input_ids, attention_mask, max_new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(input_ids, np.int32)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
    if ids.ndim != 2 or ids.shape != mask.shape:
        raise ValueError(f"generate: input_ids and attention_mask must both be [B, T]; got {ids.shape} and "
                         f"{mask.shape}.")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError("generate: empty batch or empty prompts.")
    if not mask[:, -1].all():
        raise ValueError("generate: prompts must be left-padded (attention_mask[:, -1] must be 1 for every row).")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}.")
    return ids, mask


def _pad_to_buckets(ids: np.ndarray, mask: np.ndarray, pad: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-pad ``[B, T]`` to the length bucket and add finished dummy rows up to the batch bucket."""
    b, t = ids.shape
    bb, tb = round_batch(b), round_length(t)
    out_ids = np.full((bb, tb), pad, np.int32)
    out_mask = np.zeros((bb, tb), np.int32)
    out_ids[:b, tb - t:], out_mask[:b, tb - t:] = ids, mask
    out_ids[b:], out_mask[b:] = out_ids[0], out_mask[0]  # dummies copy row 0, already done
    done = np.arange(bb) >= b
    return out_ids, out_mask, done


def _eos_array(eos: tuple[int, ...]) -> jax.Array:
    size = max(4, -(-len(eos) // 4) * 4)
    return jnp.asarray(list(eos) + [-1] * (size - len(eos)), jnp.int32)


def _run_cached(params, cfg, ids, mask, done, key, n_new, max_new, stop, tokenizer, chunk, top_k, sample, consts,
                b):
    """Prefill, then decode in chunks (one chunk when there are no stop strings). Returns ``out [Bb, n_new]``."""
    state = _prefill(params, cfg, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(done), key=key, n_new=n_new,
                     top_k=top_k, sample=sample, **consts)
    step = 1
    prompt_tail = (ids[:, -8:], mask[:, -8:])
    while step < max_new:
        until = max_new if not stop else min(max_new, step + chunk)
        state = _decode(params, cfg, state, jnp.int32(until), top_k=top_k, sample=sample, **consts)
        step = int(state["step"])
        if stop:
            newly = _rows_hitting_stop(np.asarray(state["out"][:b, :step]), np.asarray(state["done"][:b]),
                                       prompt_tail, consts, stop, tokenizer)
            if newly.any():
                state = {**state, "done": state["done"] | jnp.asarray(np.pad(newly, (0, ids.shape[0] - b)))}
        if bool(jnp.all(state["done"])):
            break
    return np.asarray(state["out"])


def _rows_hitting_stop(out: np.ndarray, done: np.ndarray, prompt_tail, consts, stop, tokenizer) -> np.ndarray:
    """Rows still running whose decoded new text contains a stop string."""
    hit = np.zeros(out.shape[0], bool)
    for r in np.flatnonzero(~done):
        text = _decode_new(tokenizer, prompt_tail[0][r], prompt_tail[1][r], out[r])
        hit[r] = any(s in text for s in stop)
    return hit


def _decode_new(tokenizer, tail_ids: np.ndarray, tail_mask: np.ndarray, new: Sequence[int]) -> str:
    """Text of ``new`` tokens as they read after the prompt (decoding them after a few prompt tokens keeps a
    leading space that a SentencePiece decoder would drop at the start of a string)."""
    ctx = [int(t) for t, m in zip(tail_ids, tail_mask) if m]
    new = [int(t) for t in new]
    head = tokenizer.decode(ctx, skip_special_tokens=True)
    full = tokenizer.decode(ctx + new, skip_special_tokens=True)
    return full[len(head):] if full.startswith(head) else tokenizer.decode(new, skip_special_tokens=True)


def _finish(out: np.ndarray, tail_ids, tail_mask, eos, pad, stop, tokenizer) -> Generation:
    """Cut every row at EOS or at its stop string; decode texts when a tokenizer is given."""
    out = out.copy()
    lengths = np.zeros(out.shape[0], np.int64)
    finish, texts = [], ([] if tokenizer is not None else None)
    for r in range(out.shape[0]):
        row = out[r]
        hits = np.flatnonzero(np.isin(row, list(eos))) if eos else np.array([], np.int64)
        n, why = (int(hits[0]) + 1, "eos") if hits.size else (len(row), "length")
        text = None
        if tokenizer is not None:
            body = row[:n - 1] if why == "eos" else row[:n]
            text = _decode_new(tokenizer, tail_ids[r], tail_mask[r], body)
            cut = _first_stop(text, stop)
            if cut is not None:
                n, why = _tokens_up_to_stop(tokenizer, tail_ids[r], tail_mask[r], body, stop), "stop"
                text = text[:cut]
            texts.append(text)
        row[n:] = pad
        lengths[r] = n
        finish.append(why)
    return Generation(tokens=out, lengths=lengths, finish=finish, texts=texts)


def _first_stop(text: str, stop: Sequence[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else None


def _tokens_up_to_stop(tokenizer, tail_ids, tail_mask, body: np.ndarray, stop) -> int:
    """Fewest leading tokens of ``body`` whose text already contains a stop string (binary search)."""
    lo, hi = 1, len(body)
    while lo < hi:
        mid = (lo + hi) // 2
        if _first_stop(_decode_new(tokenizer, tail_ids, tail_mask, body[:mid]), stop) is not None:
            hi = mid
        else:
            lo = mid + 1
    return lo


def generate_text(params: Params, cfg: ModelConfig, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                  stop: Sequence[str] = (), add_special_tokens: bool = True, max_prompt_tokens: int | None = None,
                  **kw) -> Generation:
    """Tokenize ``prompts`` (left-truncated to ``max_prompt_tokens``), left-pad them and :func:`generate`."""
    batch = [list(tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"]) for p in prompts]
    if max_prompt_tokens is not None:
        batch = [ids[-max_prompt_tokens:] for ids in batch]
    width = max(len(x) for x in batch)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    ids = np.full((len(batch), width), pad, np.int32)
    mask = np.zeros((len(batch), width), np.int32)
    for i, x in enumerate(batch):
        if not x:
            raise ValueError(f"generate_text: prompt {i} tokenizes to nothing.")
        ids[i, width - len(x):], mask[i, width - len(x):] = x, 1
    eos = kw.pop("eos_ids", None)
    if eos is None:
        eos = tuple(dict.fromkeys([*cfg.eos_ids, *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None
                                                     else [])]))
    return generate(params, cfg, ids, mask, max_new_tokens, stop=stop, eos_ids=eos, tokenizer=tokenizer, **kw)
