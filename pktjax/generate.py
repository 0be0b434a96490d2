"""Autoregressive decoding with a KV cache, by continuous batching.

A fixed number of decode slots share one KV cache. Prompts are admitted in their order: each is prefilled into a
free slot, and a row that stops (EOS, its token budget, or a stop string) frees its slot for the next waiting
prompt at once, so no slot idles until the longest row of a batch ends. Slot count, cache length, prefill group
size and prompt length are rounded to buckets, so the jitted prefill and decode loop compile once per bucket.
The decode loop is a ``lax.while_loop`` that runs until a slot stops while prompts wait (or every slot has
stopped); with stop strings it returns every ``chunk`` steps and the host decodes the new text to mark rows whose
text contains a stop string.

The prefill projects only the last prompt position onto the vocabulary. Greedy decoding is compiled without a
random number generator; sampling (``temperature > 0``) has its own programs, and a prompt's draws depend only on
the key, the prompt's index and its step, not on its slot.

``use_cache=False`` is a slow reference path that recomputes the whole sequence with :func:`pktjax.model.forward`
at every step (one compile for the whole loop); the tests use it to check the cached path."""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pktjax.config import ModelConfig
from pktjax.model import (_NEG, _run_layers, activation_dtype, attention_mask_bias, embed, hidden_states,
                          init_cache, rope_cos_sin, unembed, unstack_layers, with_matmul_dtype)

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


def floor_batch(b: int) -> int:
    """The largest batch bucket (:func:`round_batch`) that is at most ``b >= 1``."""
    if b < 8:
        return 1 << (b.bit_length() - 1)
    return b // 8 * 8


def round_length(n: int) -> int:
    """Prompt-length bucket: multiples of 64 up to 512, then multiples of 256."""
    step = 64 if n <= 512 else 256
    return max(step, -(-n // step) * step)


def _round_new(n: int) -> int:
    return max(16, -(-n // 64) * 64) if n > 16 else 16


# ----------------------------------------------------------------------------------------------- token choice

def _choose(logits: jax.Array, temperature: jax.Array, key: jax.Array, steps: jax.Array, rows: jax.Array,
            top_k: int, sample: bool) -> jax.Array:
    """Next token per row from ``logits [B, V]``: argmax, or (``sample``) a draw at ``temperature``, among the
    ``top_k`` best tokens when ``top_k > 0``.

    Row ``r`` draws with the key ``fold_in(fold_in(key, steps[r]), rows[r])`` (``steps [B]``: tokens the row has
    written, ``rows [B]``: the prompt's index in the call or its ``sample_ids`` entry), so a prompt's sample
    depends neither on the batch
    bucket nor on the decode slot it ran in. Greedy programs contain no random number generator (it is costly to
    compile on CPU), so greedy and sampled decoding are compiled separately.
    """
    if not sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / temperature
    if top_k > 0:
        kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]
        scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    keys = jax.vmap(lambda st, r: jax.random.fold_in(jax.random.fold_in(key, st), r))(steps, rows)
    return jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------- decode slots
#
# Continuous batching: ``S`` decode slots share one KV cache ``k [L, S, KV, T, hd]``, ``v [L, S, KV, hd, T]``. A
# prompt is prefilled (left-padded to its length bucket ``P``) into cache positions ``0 .. P-1`` of a free slot;
# each decode step writes every running slot at its own position ``index [S]``. A slot whose row stops (EOS, length,
# or a stop string found by the host) is handed the next waiting prompt instead of idling until the longest row
# ends. Shapes are fixed per call (``S``, ``T``, ``N`` = new-token buffer) and prefill groups are bucketed, so the
# programs compile once per bucket.


def _empty_slots(cfg: ModelConfig, slots: int, cache_len: int, n_new: int, dtype, pad_id: int) -> dict:
    """Decode state with every slot free: cache ``index [S]``, ``key_mask [S, T]``, ``out [S, N]``,
    ``tok, pos, step, row [S]``, ``done [S]`` (True = free or stopped), the loop counter ``n`` and ``busy``
    (slot-steps that decoded a running row)."""
    cache = init_cache(cfg, slots, cache_len, dtype)
    zeros = lambda: jnp.zeros((slots,), jnp.int32)  # noqa: E731  (distinct buffers: the state is donated)
    return {"cache": {**cache, "index": zeros()}, "key_mask": jnp.zeros((slots, cache_len), jnp.int32),
            "out": jnp.full((slots, n_new), pad_id, jnp.int32), "tok": zeros(), "pos": zeros(), "step": zeros(),
            "row": zeros(), "done": jnp.ones((slots,), bool), "n": jnp.zeros((), jnp.int32),
            "busy": jnp.zeros((), jnp.int32)}


@partial(jax.jit, static_argnames=("cfg", "top_k", "sample"), donate_argnames=("state",))
def _admit(params: Params, cfg: ModelConfig, state: dict, key: jax.Array, ids: jax.Array, mask: jax.Array,
           slots: jax.Array, rows: jax.Array, max_new: jax.Array, eos: jax.Array, pad_id: jax.Array, temperature: jax.Array, *,
           top_k: int, sample: bool) -> dict:
    """Prefill the left-padded prompts ``ids, mask [n, P]`` into decode slots ``slots [n]`` (a slot index ``S``
    marks a dummy row, dropped) and pick each one's first token; ``rows [n]`` are the prompts' indices."""
    n, p = ids.shape
    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
    cache = init_cache(cfg, n, p, activation_dtype(params))
    logits, kv = _prefill_last_logits(params, cfg, ids, positions, mask, cache)
    first = _choose(logits[:, -1], temperature, key, jnp.zeros((n,), jnp.int32), rows, top_k, sample)
    done = jnp.any(first[:, None] == eos[None, :], axis=-1) | (max_new <= 1)
    out_rows = jnp.full((n, state["out"].shape[1]), pad_id, jnp.int32).at[:, 0].set(first)
    return _fill_slots(state, slots, kv, jnp.full((n,), p), mask, out_rows, first, positions[:, -1] + 1,
                       jnp.ones((n,), jnp.int32), rows, done)


def _fill_slots(state: dict, slots: jax.Array, kv: dict, index: jax.Array, key_mask: jax.Array, out: jax.Array,
                tok: jax.Array, pos: jax.Array, step: jax.Array, rows: jax.Array, done: jax.Array) -> dict:
    """``state`` with prefilled rows in decode slots ``slots [n]`` (slot ``S``: a dummy, dropped): their cache
    ``kv`` (``k, v`` of ``P`` positions), next write position ``index [n]``, ``key_mask [n, P]``, ``out [n, N]``,
    the token fed next ``tok [n]`` at position ``pos [n]``, tokens written ``step [n]``, prompt ``rows [n]``."""
    p = key_mask.shape[1]
    drop = dict(mode="drop")
    cache = state["cache"]
    cache = {"k": cache["k"].at[:, slots, :, :p].set(kv["k"].astype(cache["k"].dtype), **drop),
             "v": cache["v"].at[:, slots, :, :, :p].set(kv["v"].astype(cache["v"].dtype), **drop),
             "index": cache["index"].at[slots].set(index, **drop)}
    put = lambda name, value: state[name].at[slots].set(value, **drop)  # noqa: E731
    pad = state["key_mask"].shape[1] - p
    return {**state, "cache": cache, "key_mask": put("key_mask", jnp.pad(key_mask, ((0, 0), (0, pad)))),
            "out": put("out", out), "tok": put("tok", tok), "pos": put("pos", pos), "step": put("step", step),
            "row": put("row", rows), "done": put("done", done)}


def _prefill_last_logits(params: Params, cfg: ModelConfig, ids: jax.Array, positions: jax.Array,
                         key_mask: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    """:func:`pktjax.model.forward_cached` for a whole prompt, but with the vocabulary projection of the last
    position only: ``logits [B, 1, V]`` instead of ``[B, P, V]`` (for a 128k vocabulary and long prompts the
    full tensor costs gigabytes, and XLA does not slice it away)."""
    x, kv = _prefill(params, cfg, ids, positions, key_mask, cache)
    return unembed(params, cfg, x[:, -1:]), kv


_Q_BLOCK = 128  # prefill queries per attention block (pktjax.model.attention's q_block)


def _prefill(params: Params, cfg: ModelConfig, ids: jax.Array, positions: jax.Array, key_mask: jax.Array,
             cache: dict) -> tuple[jax.Array, dict]:
    """The last layer's output ``[B, P, d]`` over a prompt written into ``cache`` (a fresh one: ``index`` 0), and
    the cache."""
    cos, sin = rope_cos_sin(cfg, positions)
    bias = attention_mask_bias(cfg, cache["index"] + jnp.arange(ids.shape[1]), key_mask)
    x, _, kv = _run_layers(params, cfg, embed(params, ids), cos, sin, bias, capture=False, cache=cache,
                           q_block=_Q_BLOCK)
    return x, {"k": kv["k"], "v": kv["v"], "index": cache["index"] + ids.shape[1]}


# Drafts: a guess of a prompt's greedy continuation (e.g. another model's completion of it) is prefilled with the
# prompt, and the prefill checks it: the longest prefix that the model itself would write is kept as if decoded,
# and decoding goes on after it. A prefill costs a fraction of the decode steps it replaces, so a good draft makes a
# completion several times cheaper; a wrong one costs one longer prefill. A draft token is kept only when the
# prefill's logits choose it by at least ``DRAFT_MARGIN`` (the prefill and the decode step add in different orders,
# so a near-tie is left to the decode step), which keeps the output the decoder's own.

DRAFT_MARGIN = 1e-2  # logits; float32 noise between the prefill and decode paths is orders of magnitude smaller
_VERIFY_ROWS = 256  # about this many positions (of all rows) projected onto the vocabulary at once: [256, V] floats


def _verify_chunk(n: int) -> int:
    """Positions per row projected at once for ``n`` rows: 64 (a window is a multiple of 64) down to 16, so that
    each product has ``n * chunk`` of about ``_VERIFY_ROWS`` rows: wide enough to read the head's matrix at its
    speed, small enough to keep ``[n, chunk, V]`` logits out of the gigabytes."""
    return min(64, max(16, _VERIFY_ROWS // n))


def _top2(params: Params, cfg: ModelConfig, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Greedy choice ``[n, W]`` (the argmax, as the decode step picks) and its margin over the runner-up
    ``[n, W]`` at every position of ``x [n, W, d]``, projecting :func:`_verify_chunk` positions at a time. The
    runner-up is the largest logit besides the choice: two reductions, where ``lax.top_k`` over a 150k vocabulary
    is a slow sort on CPU (about 48 ms per position for Qwen2.5's, against 3 ms for the projection)."""
    n, w, d = x.shape
    c = _verify_chunk(n)
    chunks = x.reshape(n, w // c, c, d).transpose(1, 0, 2, 3)

    def one(xc):
        logits = unembed(params, cfg, xc)
        best = jnp.argmax(logits, axis=-1)
        others = jnp.where(jnp.arange(logits.shape[-1]) == best[..., None], -jnp.inf, logits)
        return best.astype(jnp.int32), jnp.max(logits, axis=-1) - jnp.max(others, axis=-1)

    best, margin = jax.lax.map(one, chunks)
    return best.transpose(1, 0, 2).reshape(n, w), margin.transpose(1, 0, 2).reshape(n, w)


@partial(jax.jit, static_argnames=("cfg", "window"), donate_argnames=("state",))
def _admit_drafts(params: Params, cfg: ModelConfig, state: dict, ids: jax.Array, mask: jax.Array, slots: jax.Array,
                  rows: jax.Array, drafted: jax.Array, min_margin: jax.Array, max_new: jax.Array, eos: jax.Array,
                  pad_id: jax.Array, *, window: int) -> dict:
    """Greedy :func:`_admit` of prompts whose last ``drafted [n]`` tokens (of ``ids, mask [n, P]``) are a draft of
    the continuation: the prefill keeps the draft's longest prefix the model confirms by ``min_margin``
    (``DRAFT_MARGIN``) as written tokens and picks the next one; at a near-tie the decode step picks it.
    ``window`` (static, >= max(drafted) + 1, a multiple of 64): positions checked at the end."""
    n, p = ids.shape
    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
    x, kv = _prefill(params, cfg, ids, positions, mask, init_cache(cfg, n, p, activation_dtype(params)))
    best, margin = _top2(params, cfg, x[:, p - window:])  # position w predicts the token at w + 1
    w = jnp.arange(window)
    start = window - 1 - drafted  # [n]: the position that predicts the draft's first token
    nxt = jnp.concatenate([ids[:, p - window + 1:], jnp.full((n, 1), -1, ids.dtype)], axis=1)
    sure = margin >= min_margin
    agree = (best == nxt) & sure
    agree = agree.at[:, -1].set(sure[:, -1])  # the last position has no draft token to agree with
    bad = (w[None, :] >= start[:, None]) & ~agree
    bad = bad & (drafted[:, None] > 0)  # a row without a draft keeps the prefill's choice, margin or not (as _admit)
    first_bad = jnp.where(bad.any(axis=1), jnp.argmax(bad, axis=1), window)
    kept = jnp.minimum(first_bad, window - 1) - start  # draft tokens kept, 0 .. drafted
    at = jnp.clip(start + kept, 0, window - 1)  # the position that predicts the next token
    near_tie = (first_bad < window) & ~jnp.take_along_axis(sure, at[:, None], axis=1)[:, 0] & (drafted > 0)
    index = p - drafted + kept  # cache position of the next token
    choice = jnp.take_along_axis(best, at[:, None], axis=1)[:, 0]
    # a near-tie: rewind one position, so that the decode step reads the last kept token and picks the next
    last = jnp.take_along_axis(ids, jnp.maximum(index - 1, 0)[:, None], axis=1)[:, 0]
    tok = jnp.where(near_tie, last, choice)
    index = jnp.where(near_tie, index - 1, index)
    step = jnp.where(near_tie, kept, kept + 1)  # tokens written to ``out``
    at_pos = lambda q: jnp.take_along_axis(positions, jnp.clip(q, 0, p - 1)[:, None], axis=1)[:, 0]  # noqa: E731
    pos = jnp.where(near_tie, at_pos(index), at_pos(index - 1) + 1)  # the position of the token fed next
    done = ~near_tie & (jnp.any(choice[:, None] == eos[None, :], axis=-1) | (step >= max_new))

    col = jnp.arange(state["out"].shape[1])[None, :]
    draft_at = jnp.take_along_axis(ids, jnp.clip(p - drafted[:, None] + col, 0, p - 1), axis=1)
    out_rows = jnp.where(col < kept[:, None], draft_at, pad_id)
    out_rows = jnp.where((col == kept[:, None]) & ~near_tie[:, None], choice[:, None], out_rows)
    key_mask = jnp.where(jnp.arange(p)[None, :] < index[:, None], mask, 0)
    return _fill_slots(state, slots, kv, index, key_mask, out_rows, tok, pos, step, rows, done)


def _slot_bias(cfg: ModelConfig, index: jax.Array, key_mask: jax.Array) -> jax.Array:
    """Additive bias ``[S, 1, 1, T]`` for one query per slot at cache position ``index [S]``: keys the slot has
    written (``key_mask``; later positions are still 0) and, with a sliding window, within the window."""
    ok = key_mask > 0
    if cfg.sliding_window is not None:
        ok = ok & ((index[:, None] - jnp.arange(key_mask.shape[1])[None, :]) < cfg.sliding_window)
    return jnp.where(ok, 0.0, _NEG)[:, None, None, :].astype(jnp.float32)


@partial(jax.jit, static_argnames=("cfg", "top_k", "sample", "window"), donate_argnames=("state",))
def _decode(params: Params, cfg: ModelConfig, state: dict, key: jax.Array, until: jax.Array, refill: jax.Array,
            max_new: jax.Array, eos: jax.Array, pad_id: jax.Array, temperature: jax.Array, shrink_at: jax.Array = 0,
            *, top_k: int, sample: bool, window: int) -> dict:
    """Decode one token per running slot per step while ``n < until``, some slot runs, (``refill``: prompts
    are waiting) no slot has stopped, (else) more than ``shrink_at`` slots run, and every running slot writes below
    cache position ``window`` (static: the steps attend to the cache's first ``window`` positions only, see
    :func:`_window`). ``params`` has stacked or per-layer layers (one program either way)."""
    slots = state["done"].shape[0]
    rows = jnp.arange(slots)

    def cond(s):
        full = jnp.any(~s["done"] & (s["cache"]["index"] >= window))
        few = ~refill & (jnp.sum(~s["done"]) <= shrink_at)  # the host moves the last rows to fewer slots
        return (s["n"] < until) & ~jnp.all(s["done"]) & ~(refill & jnp.any(s["done"])) & ~full & ~few

    def body(s):
        run = ~s["done"]
        index = s["cache"]["index"]
        key_mask = s["key_mask"].at[rows, index].set(1)
        cos, sin = rope_cos_sin(cfg, s["pos"][:, None])
        x, _, kv = _run_layers(params, cfg, embed(params, s["tok"][:, None]), cos, sin,
                               _slot_bias(cfg, index, key_mask[:, :window]), capture=False, cache=s["cache"])
        nxt = _choose(unembed(params, cfg, x[:, -1]), temperature, key, s["step"], s["row"], top_k, sample)
        out = s["out"].at[rows, jnp.where(run, s["step"], s["out"].shape[1])].set(nxt, mode="drop")
        stopped = jnp.any(nxt[:, None] == eos[None, :], axis=-1) | (s["step"] + 1 >= max_new)
        inc = run.astype(jnp.int32)
        return {**s, "cache": {"k": kv["k"], "v": kv["v"], "index": index + inc}, "key_mask": key_mask,
                "out": out, "tok": jnp.where(run, nxt, s["tok"]), "pos": s["pos"] + inc, "step": s["step"] + inc,
                "done": s["done"] | (run & stopped), "n": s["n"] + 1, "busy": s["busy"] + jnp.sum(inc)}

    return jax.lax.while_loop(cond, body, state)


_SHRINK = 4  # the slots shrink once no prompt waits and the running rows fit in a quarter of them (few new sizes:
# each compiles the decode loop once; a step's products at 2 rows cost a fraction of those at 32)


def _shrink_at(slots: int) -> int:
    """The most running rows that move to fewer slots: those whose batch bucket is at most a ``_SHRINK``-th of
    ``slots`` (0: none)."""
    return floor_batch(slots // _SHRINK) if slots >= _SHRINK else 0


@jax.jit
def _keep_slots(state: dict, keep: jax.Array) -> dict:
    """``state`` with only its decode slots ``keep [S']``, in that order (the cache's slot axis is its second)."""
    cache = state["cache"]
    take = partial(jnp.take, indices=keep)
    return {**state, "cache": {"k": take(cache["k"], axis=1), "v": take(cache["v"], axis=1),
                               "index": take(cache["index"], axis=0)},
            **{name: take(state[name], axis=0) for name in ("key_mask", "out", "tok", "pos", "step", "row", "done")}}


_WINDOW = 256  # decode windows are multiples of this: few programs, and at most this many idle positions read


def _window(index: np.ndarray, running: np.ndarray, chunk: int, cache_len: int) -> int:
    """The cache positions the next decode loop attends to: room for ``chunk`` more tokens in every running slot
    (``index [S]``: next write positions), rounded up to a multiple of ``_WINDOW``, at most the cache. A step's
    attention reads every position of its window in every slot, so a cache sized for the longest prompt and the
    whole token budget would cost every step of a short prompt as much as the longest one's."""
    need = int(index[running].max(initial=0)) + chunk
    return min(cache_len, -(-need // _WINDOW) * _WINDOW)


# ----------------------------------------------------------------------------------------------- reference path

@partial(jax.jit, static_argnames=("cfg",))
def _full_logits_at(params: Params, cfg: ModelConfig, ids: jax.Array, mask: jax.Array, col: jax.Array) -> jax.Array:
    """Logits ``[B, V]`` at column ``col`` of a full (uncached) forward over ``ids, mask [B, S]``."""
    hidden = hidden_states(params, cfg, ids, mask)
    return unembed(params, cfg, jax.lax.dynamic_index_in_dim(hidden, col, axis=1, keepdims=False))


_choose_jit = jax.jit(_choose, static_argnames=("top_k", "sample"))


def _reference_loop(params, cfg, ids, mask, done, eos, pad_id, temperature, key, n_new, steps, top_k, sample,
                    row_ids: np.ndarray):
    """No-cache decoding: ``steps`` full forward passes over a fixed ``[B, P + n_new]`` buffer (one compile);
    row ``r`` samples with key id ``row_ids[r]``."""
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
        tok = np.asarray(_choose_jit(logits, temperature, key, jnp.full((b,), step, jnp.int32), jnp.asarray(row_ids),
                                     top_k=top_k, sample=sample))
        tok = np.where(done, int(pad_id), tok)
        out[:, step] = tok
        buf[:, p + step], buf_mask[:, p + step] = tok, 1
        done |= np.isin(tok, list(eos_set))
    return out


# ----------------------------------------------------------------------------------------------- public API

def generate(params: Params, cfg: ModelConfig, input_ids, attention_mask, max_new_tokens: int,
             stop: Sequence[str] = (), eos_ids: Sequence[int] | None = None, temperature: float = 0.0,
             key: jax.Array | None = None, *, tokenizer=None, top_k: int = 0, pad_id: int | None = None,
             use_cache: bool = True, chunk: int = 16, slots: int | None = None,
             on_done: Callable[[list[int], Generation], None] | None = None,
             stats: dict | None = None, unstack: bool = True,
             drafts: Sequence[Sequence[int] | None] | None = None,
             sample_ids: Sequence[int] | None = None, matmul_dtype=None) -> Generation:
    """Greedy (``temperature == 0``) or sampled decoding of up to ``max_new_tokens`` tokens per prompt.

    ``input_ids, attention_mask [B, T]``: left-padded prompts (mask 0 on padding). A row stops at its first token
    in ``eos_ids`` (default: the config's EOS ids; ``()`` never stops on EOS) or once its decoded text contains a
    string of ``stop`` (needs ``tokenizer``; the text is checked every ``chunk`` steps and cut before the stop
    string). Sampling needs ``key`` and is reproducible with it; ``top_k > 0`` samples among the k best tokens.
    ``sample_ids``: per prompt, the integer (>= 0) folded into its sampling key in place of its index in the call,
    so that a prompt draws the same tokens whichever prompts share the call (a resumed evaluation decodes only the
    draws it lacks and gets the ones an uninterrupted run would have).

    ``slots``: how many prompts decode at once (default: all of them, rounded to a batch bucket); prompts are
    admitted in their order, and a stopped row's slot takes the next prompt at once; once no prompt waits, the
    last rows move to fewer slots (a quarter or less), so that they do not decode in a step sized for all. A
    prompt's tokens do not depend on ``slots`` or on the other prompts. ``on_done(rows, generation)`` is called
    as prompts finish, with their indices and a :class:`Generation` of those rows (e.g. to save completions as
    they come). ``stats``: a dict to
    fill with timings (``prefill_s``, ``decode_s``, ``host_s``), ``decode_steps``, ``slots`` (at the
    start), ``shrinks`` (the slot counts the tail shrank to), ``slot_steps`` (decode steps times their slots),
    ``occupancy`` (running slot-steps / all slot-steps), ``prefills`` (prefill calls), ``prefill_tokens`` (prompt
    and draft tokens prefilled) and ``prefill_positions`` (the same with the length buckets' padding); it waits for
    the device after each program to time it.
    ``unstack``: decode from per-layer copies of the layer weights (:func:`pktjax.model.unstack_layers`, held for
    the call: as much memory again as the layer stacks) instead of slicing them out of the stacks at every step,
    which copies every weight once per step on CPU; ``False`` saves the memory at the cost of a slower step.
    ``drafts`` (greedy only): per prompt, token ids guessed to continue it (e.g. another model's completion), or
    ``None``; the prefill keeps the longest prefix the model confirms and decoding goes on from there, so the tokens
    are the same as without drafts (near-ties are left to the decode step: ``DRAFT_MARGIN``) at a fraction of the
    decode steps when the guesses are good (``stats`` then counts ``draft_tokens`` and ``draft_agreed``).
    ``matmul_dtype`` (e.g. ``"bfloat16"``): multiply by copies of the weight matrices in that dtype, activations
    and sums staying in theirs (:func:`pktjax.model.with_matmul_dtype`; the per-layer copies are then in it too).
    Returns a :class:`Generation` (``tokens [B, max_new_tokens]``, ``lengths``, ``finish``, ``texts``).
    """
    ids, mask = _check_inputs(input_ids, attention_mask, max_new_tokens)
    if matmul_dtype is not None:
        params = with_matmul_dtype(params, matmul_dtype)
    stop = [s for s in ([stop] if isinstance(stop, str) else list(stop)) if s]
    if stop and tokenizer is None:
        raise ValueError("generate: stop strings need a tokenizer to decode the new text (pass tokenizer=...).")
    if slots is not None and slots < 1:
        raise ValueError(f"generate: slots must be >= 1, got {slots}.")
    greedy = float(temperature) <= 0.0
    drafts = _check_drafts(drafts, ids.shape[0], max_new_tokens, greedy)
    if not greedy and key is None:
        raise ValueError("generate: sampling (temperature > 0) needs a PRNG key, e.g. key=jax.random.key(0).")
    eos = tuple(cfg.eos_ids if eos_ids is None else eos_ids)
    pad = int(pad_id if pad_id is not None else (eos[0] if eos else 0))
    b = ids.shape[0]
    row_ids = np.arange(b, dtype=np.int32) if sample_ids is None else np.asarray(sample_ids, np.int32)
    if row_ids.shape != (b,) or (row_ids < 0).any():
        raise ValueError(f"generate: sample_ids needs one integer >= 0 per prompt ({b}).")
    n_new = _round_new(max_new_tokens)
    consts = dict(eos=_eos_array(eos), pad_id=jnp.int32(pad), temperature=jnp.float32(max(temperature, 1e-6)))
    key = key if key is not None else jax.random.key(0)
    tails = (ids[:, -8:], mask[:, -8:])
    finish = partial(_finish, eos=eos, pad=pad, stop=stop, tokenizer=tokenizer)
    if not use_cache:  # drafts change only the cost, so the reference path ignores them
        ids_b, mask_b, done_b = _pad_to_buckets(ids, mask, pad)
        out = _reference_loop(params, cfg, ids_b, mask_b, done_b, consts["eos"], consts["pad_id"],
                              consts["temperature"], key, n_new, max_new_tokens, top_k, not greedy,
                              np.concatenate([row_ids, np.arange(b, ids_b.shape[0], dtype=np.int32)]))
        gen = finish(out[:b, :max_new_tokens], *tails)
        if on_done is not None:
            on_done(list(range(b)), gen)
        return gen
    parts: list[tuple[list[int], Generation]] = []

    def harvest(rows: list[int], tokens: np.ndarray) -> None:
        part = finish(tokens[:, :max_new_tokens], tails[0][rows], tails[1][rows])
        parts.append((rows, part))
        if stats is not None and drafts is not None:
            for r, toks in zip(rows, part.tokens):
                d = drafts[r]
                stats["draft_tokens"] = stats.get("draft_tokens", 0) + d.size
                stats["draft_agreed"] = stats.get("draft_agreed", 0) + int(np.cumprod(toks[:d.size] == d).sum())
        if on_done is not None:
            on_done(rows, part)

    step_params = unstack_layers(params) if unstack else params
    _run_slots(params, step_params, cfg, ids, mask, key, n_new, max_new_tokens, slots or round_batch(b), stop,
               tokenizer, chunk, top_k, not greedy, consts, harvest, stats, drafts, row_ids)
    return _gather(parts, b, max_new_tokens, tokenizer is not None)


def _gather(parts: list[tuple[list[int], Generation]], b: int, n: int, with_text: bool) -> Generation:
    """One :class:`Generation` of ``b`` rows from the parts finished in any order."""
    tokens, lengths = np.zeros((b, n), np.int32), np.zeros(b, np.int64)
    finish: list[str] = [""] * b
    texts: list[str] | None = [""] * b if with_text else None
    for rows, g in parts:
        tokens[rows], lengths[rows] = g.tokens, g.lengths
        for j, r in enumerate(rows):
            finish[r] = g.finish[j]
            if texts is not None:
                texts[r] = g.texts[j]
    return Generation(tokens=tokens, lengths=lengths, finish=finish, texts=texts)


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


def _check_drafts(drafts, b: int, max_new_tokens: int, greedy: bool) -> list[np.ndarray] | None:
    """Drafts as int32 arrays of at most ``max_new_tokens - 1`` tokens (the model always picks the last one)."""
    if drafts is None:
        return None
    if not greedy:
        raise ValueError("generate: drafts apply to greedy decoding (temperature 0); a sampled token cannot be "
                         "checked against a guess.")
    if len(drafts) != b:
        raise ValueError(f"generate: {len(drafts)} drafts for {b} prompts; give one per prompt (None for none).")
    return [np.asarray(list(d or ())[:max_new_tokens - 1], np.int32) for d in drafts]


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


def _run_slots(params, step_params, cfg, ids, mask, key, n_new, max_new, n_slots, stop, tokenizer, chunk, top_k,
               sample, consts, harvest, stats: dict | None = None, drafts: list[np.ndarray] | None = None,
               row_ids: np.ndarray | None = None) -> None:
    """Continuous batching over ``n_slots`` decode slots: admit waiting prompts (each with its draft, if any) into
    free slots, decode until a slot stops (or, with stop strings, every ``chunk`` steps to look for them), hand
    finished rows to ``harvest(rows, tokens [n, N])``, repeat until every prompt is done; once none waits, the
    slots shrink to the running rows' batch bucket whenever that is a ``_SHRINK``-th of them. Prefills read
    ``params`` (stacked layers: a long prompt's products dwarf the slicing, and one compiled layer compiles fast), the
    decode loop ``step_params`` (the same weights, per layer when unstacked)."""
    b = ids.shape[0]
    lengths = mask.sum(axis=1) + (np.array([d.size for d in drafts]) if drafts is not None else 0)
    cache_len = round_length(int(lengths.max())) + n_new
    state = _empty_slots(cfg, n_slots, cache_len, n_new, activation_dtype(params), int(consts["pad_id"]))
    waiting = list(range(b))[::-1]  # popped from the end: prompts are admitted in their order
    owner = np.full(n_slots, -1)
    max_new_j = jnp.int32(max_new)
    compiled = dict(top_k=top_k, sample=sample)
    clock = _Clock(stats, n_slots)
    while True:
        # Free slots take waiting prompts in groups of a batch bucket's size (3 free slots: a group of 2, then one
        # of 1), so that no prefill computes padding rows; a group of n prompts of similar length costs about n
        # prompts' products either way.
        while waiting and (free := np.flatnonzero(owner < 0)).size:
            take = [waiting.pop() for _ in range(floor_batch(min(free.size, len(waiting))))]
            group = _admission(ids, mask, lengths, take, free, n_slots, consts, drafts, row_ids)
            if drafts is None:
                state = _admit(params, cfg, state, key, *group, max_new_j, **consts, **compiled)
            else:
                window = min(int(group[0].shape[1]), round_length(int(group[-1].max()) + 1))
                state = _admit_drafts(params, cfg, state, *group[:4], group[-1], jnp.float32(DRAFT_MARGIN),
                                      max_new_j, consts["eos"], consts["pad_id"], window=window)
            clock.lap("prefill_s", state)
            clock.count(prefills=1, prefill_tokens=int(lengths[take].sum()), prefill_positions=group[1].size)
            owner[free[:len(take)]] = take
        if (owner < 0).all():
            clock.close(state)
            return
        running = np.flatnonzero(owner >= 0)
        if not waiting and running.size <= _shrink_at(owner.size):
            # the last rows would otherwise decode alone in a step sized for every slot
            keep = np.concatenate([running, np.flatnonzero(owner < 0)[:round_batch(running.size) - running.size]])
            clock.resize(state, keep.size)
            state, owner = _keep_slots(state, jnp.asarray(keep, jnp.int32)), owner[keep]
        until = int(state["n"]) + (chunk if stop else n_new)
        window = _window(np.asarray(state["cache"]["index"]), owner >= 0, chunk, cache_len)
        state = _decode(step_params, cfg, state, key, jnp.int32(until), jnp.bool_(bool(waiting)), max_new_j,
                        **consts, shrink_at=jnp.int32(_shrink_at(owner.size)), **compiled, window=window)
        clock.lap("decode_s", state)
        done, out, step = np.array(state["done"]), np.asarray(state["out"]), np.asarray(state["step"])
        if stop:
            busy = np.flatnonzero((owner >= 0) & ~done)
            hit = [s for s in busy if _hits_stop(tokenizer, ids[owner[s], -8:], mask[owner[s], -8:],
                                                 out[s, :step[s]], stop)]
            if hit:
                done[hit] = True
                state = {**state, "done": jnp.asarray(done)}
        ended = np.flatnonzero((owner >= 0) & done)
        if ended.size:
            harvest([int(owner[s]) for s in ended], out[ended])
            owner[ended] = -1
        clock.lap("host_s", None)


class _Clock:
    """Wall time of the prefills, decode loops and host work of :func:`_run_slots` into ``stats`` (a no-op without
    it: timing waits for the device, which would otherwise overlap with the host)."""

    def __init__(self, stats: dict | None, slots: int):
        self.stats, self.t = stats, time.perf_counter()
        self.slots, self.mark, self.slot_steps = slots, 0, 0  # slot-steps of the decode steps before ``mark``
        if stats is not None:
            stats.update(prefill_s=0.0, decode_s=0.0, host_s=0.0, slots=slots, prefills=0, prefill_tokens=0,
                         prefill_positions=0, shrinks=[])

    def count(self, **added: int) -> None:
        if self.stats is not None:
            for name, n in added.items():
                self.stats[name] += n

    def lap(self, name: str, state: dict | None) -> None:
        if self.stats is None:
            return
        if state is not None:
            jax.block_until_ready(state["done"])
        now = time.perf_counter()
        self.stats[name] += now - self.t
        self.t = now

    def resize(self, state: dict, slots: int) -> None:
        """The decode steps from now on run ``slots`` slots."""
        if self.stats is not None:
            steps = int(state["n"])
            self.slot_steps += (steps - self.mark) * self.slots
            self.mark, self.slots = steps, slots
            self.stats["shrinks"].append(slots)

    def close(self, state: dict) -> None:
        if self.stats is not None:
            steps, busy = int(state["n"]), int(state["busy"])
            self.slot_steps += (steps - self.mark) * self.slots
            self.stats.update(decode_steps=steps, busy_slot_steps=busy, slot_steps=self.slot_steps,
                              occupancy=busy / max(1, self.slot_steps))


def _admission(ids, mask, lengths, take, free, n_slots, consts, drafts=None, row_ids=None) -> tuple:
    """``ids, mask [n, P], slots [n], rows [n]`` for prompts ``take`` going into slots ``free``: each prompt
    left-padded to the group's length bucket, the group padded to a batch bucket with dummies (slot ``S``); a
    row's sampling key id is ``row_ids[prompt]`` (default: the prompt's index). With ``drafts``, each prompt is
    followed by its draft, and ``drafted [n]`` (draft lengths) comes last."""
    n, p = round_batch(len(take)), round_length(int(lengths[take].max()))
    pad = int(consts["pad_id"])
    g_ids, g_mask = np.full((n, p), pad, np.int32), np.zeros((n, p), np.int32)
    slots, rows, drafted = np.full(n, n_slots, np.int32), np.zeros(n, np.int32), np.zeros(n, np.int32)
    for j in range(n):
        r = take[j] if j < len(take) else take[0]  # dummies copy the first prompt; their slot is dropped
        keep = ids[r][mask[r] > 0]
        if drafts is not None:
            keep, drafted[j] = np.concatenate([keep, drafts[r]]), drafts[r].size
        g_ids[j, p - keep.size:], g_mask[j, p - keep.size:] = keep, 1
        if j < len(take):
            slots[j], rows[j] = free[j], r if row_ids is None else row_ids[r]
    group = (jnp.asarray(g_ids), jnp.asarray(g_mask), jnp.asarray(slots), jnp.asarray(rows))
    return group if drafts is None else (*group, drafted)


def _hits_stop(tokenizer, tail_ids: np.ndarray, tail_mask: np.ndarray, new: np.ndarray, stop) -> bool:
    """Whether the decoded new text contains a stop string."""
    text = _decode_new(tokenizer, tail_ids, tail_mask, new)
    return any(s in text for s in stop)


def _decode_new(tokenizer, tail_ids: np.ndarray, tail_mask: np.ndarray, new: Sequence[int]) -> str:
    """Text of ``new`` tokens as they read after the prompt (decoding them after a few prompt tokens keeps a
    leading space that a SentencePiece decoder would drop at the start of a string)."""
    ctx = [int(t) for t, m in zip(tail_ids, tail_mask) if m]
    new = [int(t) for t in new]
    head = tokenizer.decode(ctx, skip_special_tokens=True)
    full = tokenizer.decode(ctx + new, skip_special_tokens=True)
    return full[len(head):] if full.startswith(head) else tokenizer.decode(new, skip_special_tokens=True)


def _finish(out: np.ndarray, tail_ids, tail_mask, *, eos, pad, stop, tokenizer) -> Generation:
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
