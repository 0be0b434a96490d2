"""KV-cache generation equals transformers' greedy generate token for token; buckets, EOS, stop strings, sampling."""

import jax
import numpy as np
import pytest
import torch

import pktjax
from pktjax.generate import _admit, _decode, floor_batch, generate, round_length
from pktjax.model import forward, forward_cached, forward_trace, init_cache, unstack_layers
from pktjax.tokenizer import load_tokenizer
from tests.tiny import FAMILIES, VOCAB, torch_model

PAD, EOS, NEW = 3, 2, 24


def _prompts(lengths=(200, 150, 100), seed=0):
    """Left-padded ``ids, mask [len(lengths), max(lengths)]`` of random non-special tokens. The default shapes
    fall into the same buckets as the tiny-model GSM8K run of test_eval (batch 4, length 256, 64 new tokens)."""
    width = max(lengths)
    ids = np.random.RandomState(seed).randint(4, VOCAB, size=(len(lengths), width))
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, width - n:] = 1
    ids[mask == 0] = PAD
    return ids, mask


def _hf_generate(folder, ids, mask, new=NEW, eos=EOS):
    """transformers' greedy decoding (KV cache), EOS -> PAD afterwards; returns the new tokens ``[B, new]``."""
    with torch.no_grad():
        out = torch_model(folder).generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                                           max_new_tokens=new, do_sample=False, eos_token_id=eos, pad_token_id=PAD)
    out = out[:, ids.shape[1]:].numpy()
    return np.pad(out, ((0, 0), (0, new - out.shape[1])), constant_values=PAD)  # all rows may stop early


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_batched_matches_transformers(tiny_dir, family):
    folder = tiny_dir(family)
    model = pktjax.load_model(folder)
    ids, mask = _prompts()
    ours = generate(model.params, model.config, ids, mask, NEW, eos_ids=(EOS,), pad_id=PAD)
    np.testing.assert_array_equal(ours.tokens, _hf_generate(folder, ids, mask))
    assert ours.tokens.shape == (3, NEW) and len(ours.finish) == 3


def test_unbatched_and_uncached_match_transformers(tiny_dir):
    folder = tiny_dir("mistral")  # GQA + sliding window: the cache bookkeeping that matters most
    model = pktjax.load_model(folder)
    ids, mask = _prompts()
    ref = _hf_generate(folder, ids, mask)
    nocache = generate(model.params, model.config, ids, mask, NEW, eos_ids=(EOS,), pad_id=PAD, use_cache=False)
    np.testing.assert_array_equal(nocache.tokens, ref)
    for row in (0, 2):  # the longest prompt and the most padded one, each alone
        keep = mask[row].astype(bool)
        single_ids, single_mask = ids[row:row + 1, keep], mask[row:row + 1, keep]
        alone = generate(model.params, model.config, single_ids, single_mask, NEW, eos_ids=(EOS,), pad_id=PAD)
        np.testing.assert_array_equal(alone.tokens, _hf_generate(folder, single_ids, single_mask))
        np.testing.assert_array_equal(alone.tokens[0], ref[row])  # padding does not change a row's tokens


def test_eos_stops_each_row_like_transformers(tiny_dir):
    folder = tiny_dir("llama2")
    model = pktjax.load_model(folder)
    ids, mask = _prompts()
    free = generate(model.params, model.config, ids, mask, NEW, eos_ids=(), pad_id=PAD)
    assert free.finish == ["length"] * 3
    stop_tok = int(free.tokens[0, 4])  # row 0 must stop at step 4 (or earlier, if the token came sooner)
    ours = generate(model.params, model.config, ids, mask, NEW, eos_ids=(stop_tok,), pad_id=PAD)
    np.testing.assert_array_equal(ours.tokens, _hf_generate(folder, ids, mask, eos=stop_tok))
    assert ours.finish[0] == "eos" and ours.lengths[0] <= 5
    assert (ours.tokens[0, ours.lengths[0]:] == PAD).all()


def test_one_compile_per_bucket(tiny_dir):
    """Calls whose prefill groups (a batch bucket of prompts, a length bucket) and caches fall into buckets already
    met compile nothing new: three prompts fill four slots as a group of 2 and one of 1, four as one group."""
    model = pktjax.load_model(tiny_dir("llama2"))
    for lengths in ((200, 150, 210), (230, 199, 256, 210)):
        generate(model.params, model.config, *_prompts(lengths), NEW, eos_ids=(EOS,), pad_id=PAD)
    sizes = (_admit._cache_size(), _decode._cache_size())
    for lengths, new in (((240, 255, 193, 201), 40), ((250,) * 3, 17), ((220, 201, 199), 64)):  # same buckets
        generate(model.params, model.config, *_prompts(lengths, seed=len(lengths)), new, eos_ids=(EOS,),
                 pad_id=PAD)
    assert (_admit._cache_size(), _decode._cache_size()) == sizes


def test_sampling_is_reproducible_with_a_key(tiny_dir):
    model = pktjax.load_model(tiny_dir("mistral"))
    ids, mask = _prompts()
    kw = dict(eos_ids=(), pad_id=PAD, temperature=1.5)
    a = generate(model.params, model.config, ids, mask, NEW, key=jax.random.key(1), **kw)
    b = generate(model.params, model.config, ids, mask, NEW, key=jax.random.key(1), **kw)
    c = generate(model.params, model.config, ids, mask, NEW, key=jax.random.key(2), **kw)
    ref = generate(model.params, model.config, ids, mask, NEW, key=jax.random.key(1), use_cache=False, **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.tokens, ref.tokens)
    assert (a.tokens != c.tokens).any()
    greedy = generate(model.params, model.config, ids, mask, NEW, eos_ids=(), pad_id=PAD)
    assert (a.tokens != greedy.tokens).any()
    with pytest.raises(ValueError, match="key"):
        generate(model.params, model.config, ids, mask, NEW, temperature=1.0)


def test_stop_string_cuts_text_and_tokens(tiny_dir):
    folder = tiny_dir("llama2")
    model, tok = pktjax.load_model(folder), load_tokenizer(folder)
    ids, mask = _prompts()
    full = generate(model.params, model.config, ids, mask, NEW, eos_ids=(), pad_id=PAD, tokenizer=tok)
    text = full.texts[0]
    k = next(i for i in range(3, len(text)) if text[i] != "\ufffd" and text[i].strip())
    stop = text[k]
    cut = generate(model.params, model.config, ids, mask, NEW, stop=[stop, "never-seen"], eos_ids=(), pad_id=PAD,
                   tokenizer=tok, chunk=4)
    assert cut.texts[0] == text[:text.find(stop)]
    assert cut.finish[0] == "stop" and cut.lengths[0] < NEW
    np.testing.assert_array_equal(cut.tokens[0, :cut.lengths[0]], full.tokens[0, :cut.lengths[0]])
    assert (cut.tokens[0, cut.lengths[0]:] == PAD).all()
    for row in (1, 2):  # other rows stop at their own first occurrence, or run to the end
        expect = full.texts[row].split(stop)[0]
        assert cut.texts[row] == expect


def test_bad_inputs_are_refused(tiny_dir):
    model = pktjax.load_model(tiny_dir("llama2"))
    ids, mask = _prompts()
    right_padded = mask[:, ::-1]
    with pytest.raises(ValueError, match="left-padded"):
        generate(model.params, model.config, ids, right_padded, 4)
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model.params, model.config, ids, mask, 4, stop=["x"])


def test_continuous_batching_equals_one_batch_and_transformers(tiny_dir):
    """Seven prompts through two decode slots: rows stop at different steps (a frequent token is EOS), freed
    slots take the next prompt, and every row's tokens equal transformers' on the whole batch at once."""
    folder = tiny_dir("mistral")  # GQA + sliding window
    model = pktjax.load_model(folder)
    ids, mask = _prompts((200, 37, 150, 64, 100, 180, 12), seed=3)
    free = generate(model.params, model.config, ids, mask, NEW, eos_ids=(), pad_id=PAD)
    stop_tok = int(free.tokens[1, 3])
    done, stats = [], {}
    slotted = generate(model.params, model.config, ids, mask, NEW, eos_ids=(stop_tok,), pad_id=PAD, slots=2,
                       on_done=lambda rows, g: done.extend(zip(rows, g.tokens.tolist())), stats=stats)
    # every kept token but each row's first (picked by the prefill) took one running slot-step of the decode loop
    assert stats["busy_slot_steps"] == slotted.lengths.sum() - 7
    assert stats["occupancy"] == stats["busy_slot_steps"] / (2 * stats["decode_steps"]) and stats["slots"] == 2
    ref = _hf_generate(folder, ids, mask, eos=stop_tok)
    np.testing.assert_array_equal(slotted.tokens, ref)
    assert len(set(slotted.lengths.tolist())) > 1  # the rows really stopped at different steps
    assert sorted(r for r, _ in done) == list(range(7))
    for r, toks in done:  # the rows handed out as they finished are the final ones
        assert toks == slotted.tokens[r].tolist()
    whole = generate(model.params, model.config, ids, mask, NEW, eos_ids=(stop_tok,), pad_id=PAD)
    np.testing.assert_array_equal(whole.tokens, ref)


def test_last_rows_move_to_fewer_slots(tiny_dir):
    """Once no prompt waits, the rows still running move to a quarter of the slots or fewer: greedy and sampled
    tokens are those of one batch, and occupancy counts the smaller steps' slots. Nine prompts in 8 slots; EOS
    ids chosen so that all but the last two stop early, which then decode in 2 slots."""
    model = pktjax.load_model(tiny_dir("llama2"))
    ids, mask = _prompts((200, 37, 150, 64, 100, 180, 12, 90, 120), seed=3)
    new, long = 40, [7, 8]
    for kw in (dict(pad_id=PAD), dict(pad_id=PAD, temperature=1.5, key=jax.random.key(3))):
        free = generate(model.params, model.config, ids, mask, new, eos_ids=(), **kw).tokens
        # (a draw depends on the step and the prompt only, so the rows are these until they stop)
        eos = tuple({next(int(t) for t in free[r, 2:] if t not in free[long]) for r in range(7)})
        stats = {}
        slotted = generate(model.params, model.config, ids, mask, new, slots=8, stats=stats, eos_ids=eos, **kw)
        whole = generate(model.params, model.config, ids, mask, new, eos_ids=eos, **kw)
        np.testing.assert_array_equal(slotted.tokens, whole.tokens)
        assert (slotted.lengths[:7] < 30).all() and (slotted.lengths[long] == new).all()
        assert stats["shrinks"] == [2]
        assert stats["slot_steps"] < 8 * stats["decode_steps"]
        assert stats["occupancy"] == stats["busy_slot_steps"] / stats["slot_steps"]
        assert stats["busy_slot_steps"] == slotted.lengths.sum() - len(ids)


def test_free_slots_are_filled_without_padding_rows(tiny_dir):
    """Three free slots take a group of 2 prompts, then a group of 1 (batch buckets, no padding row), and the
    prefill counts say so; every row's tokens are still those of one batch."""
    model = pktjax.load_model(tiny_dir("llama2"))
    ids, mask = _prompts((200, 37, 150), seed=5)
    stats = {}
    slotted = generate(model.params, model.config, ids, mask, NEW, eos_ids=(), pad_id=PAD, slots=3, stats=stats)
    assert [floor_batch(b) for b in (1, 2, 3, 7, 8, 9, 17)] == [1, 2, 2, 4, 8, 8, 16]
    assert stats["prefills"] == 2 and stats["prefill_tokens"] == 200 + 37 + 150
    assert stats["prefill_positions"] == 2 * round_length(200) + round_length(150)  # not 4 rows of 256
    whole = generate(model.params, model.config, ids, mask, NEW, eos_ids=(), pad_id=PAD)
    np.testing.assert_array_equal(slotted.tokens, whole.tokens)


def test_decode_windows_grow_with_the_rows(tiny_dir):
    """A short prompt in a cache sized for a long one decodes in windows of the cache (its steps attend to the
    first 256 positions, then 512): the tokens are those of one batch over the whole cache, and of the uncached
    reference, greedy and sampled; the sliding window (Mistral) still applies."""
    model = pktjax.load_model(tiny_dir("mistral"))
    ids, mask = _prompts((37, 300), seed=9)
    new = 250  # the short prompt's bucket (64) + 250 tokens cross position 256
    for kw in (dict(eos_ids=(), pad_id=PAD), dict(eos_ids=(), pad_id=PAD, temperature=1.5, key=jax.random.key(5))):
        before = _decode._cache_size()
        windowed = generate(model.params, model.config, ids, mask, new, slots=1, **kw)
        assert _decode._cache_size() - before >= 2  # more than one window was compiled and run
        whole = generate(model.params, model.config, ids, mask, new, **kw)  # both rows at 320: the whole cache
        np.testing.assert_array_equal(windowed.tokens, whole.tokens)
        ref = generate(model.params, model.config, ids, mask, new, use_cache=False, **kw)
        np.testing.assert_array_equal(windowed.tokens, ref.tokens)


def test_sampling_does_not_depend_on_slots(tiny_dir):
    model = pktjax.load_model(tiny_dir("llama2"))
    ids, mask = _prompts((200, 37, 150, 64, 100), seed=4)
    kw = dict(eos_ids=(), pad_id=PAD, temperature=1.5, key=jax.random.key(7))
    one = generate(model.params, model.config, ids, mask, NEW, **kw)
    two = generate(model.params, model.config, ids, mask, NEW, slots=2, **kw)
    ref = generate(model.params, model.config, ids, mask, NEW, use_cache=False, **kw)
    np.testing.assert_array_equal(one.tokens, two.tokens)
    np.testing.assert_array_equal(one.tokens, ref.tokens)


def test_sample_ids_give_a_prompt_its_draws_in_any_call(tiny_dir):
    """A subset of the prompts, each with its index in the full call as its sample id, draws exactly the tokens it
    draws in the full call (cached and reference paths): what a resumed sampled evaluation relies on."""
    model = pktjax.load_model(tiny_dir("llama2"))
    ids, mask = _prompts((200, 37, 150, 64, 100), seed=4)
    kw = dict(eos_ids=(), pad_id=PAD, temperature=1.5, key=jax.random.key(7))
    full = generate(model.params, model.config, ids, mask, NEW, **kw)
    rows = [3, 1]
    part = generate(model.params, model.config, ids[rows], mask[rows], NEW, slots=1, sample_ids=rows, **kw)
    np.testing.assert_array_equal(part.tokens, full.tokens[rows])
    ref = generate(model.params, model.config, ids[rows], mask[rows], NEW, use_cache=False, sample_ids=rows, **kw)
    np.testing.assert_array_equal(ref.tokens, full.tokens[rows])
    plain = generate(model.params, model.config, ids[rows], mask[rows], NEW, **kw)  # ids 0, 1: other draws
    assert (plain.tokens != full.tokens[rows]).any()
    with pytest.raises(ValueError, match="sample_ids"):
        generate(model.params, model.config, ids, mask, NEW, sample_ids=[0, 1], **kw)


def stop_case(tiny_dir):
    """``(model, tok, ids, mask, full, stop)``: five prompts, their completions without stop strings (``full``)
    and a stop string, a character that the first completion holds after its third."""
    folder = tiny_dir("llama2")
    model, tok = pktjax.load_model(folder), load_tokenizer(folder)
    ids, mask = _prompts((200, 37, 150, 64, 100), seed=5)
    full = generate(model.params, model.config, ids, mask, NEW, eos_ids=(), pad_id=PAD, tokenizer=tok)
    text = full.texts[0]
    stop = next(text[i] for i in range(3, len(text)) if text[i] != "\ufffd" and text[i].strip())
    return model, tok, ids, mask, full, stop


def test_stop_strings_with_slots_match_one_batch(tiny_dir):
    model, tok, ids, mask, full, stop = stop_case(tiny_dir)
    kw = dict(stop=[stop], eos_ids=(), pad_id=PAD, tokenizer=tok, chunk=4)
    one = generate(model.params, model.config, ids, mask, NEW, **kw)
    two = generate(model.params, model.config, ids, mask, NEW, slots=2, **kw)
    assert one.texts == two.texts == [t.split(stop)[0] for t in full.texts]
    np.testing.assert_array_equal(one.tokens, two.tokens)
    assert one.finish == two.finish and "stop" in one.finish
    with pytest.raises(ValueError, match="slots"):
        generate(model.params, model.config, ids, mask, NEW, slots=0)


def test_per_layer_decode_equals_stacked_and_reference(tiny_dir):
    """The decode loop over per-layer weight copies (the default) gives the tokens of the scan over the stacks and
    of the uncached reference, greedy through continuous batching and sampled."""
    model = pktjax.load_model(tiny_dir("mistral"))  # GQA + sliding window
    ids, mask = _prompts((200, 37, 150, 64, 100), seed=6)
    for kw in (dict(eos_ids=(), pad_id=PAD), dict(eos_ids=(), pad_id=PAD, temperature=1.5, key=jax.random.key(3))):
        per_layer = generate(model.params, model.config, ids, mask, NEW, slots=2, **kw)
        stacked = generate(model.params, model.config, ids, mask, NEW, slots=2, unstack=False, **kw)
        ref = generate(model.params, model.config, ids, mask, NEW, use_cache=False, **kw)
        np.testing.assert_array_equal(per_layer.tokens, stacked.tokens)
        np.testing.assert_array_equal(per_layer.tokens, ref.tokens)


def test_forward_reads_per_layer_weights_like_the_stacks(tiny_dir):
    model = pktjax.load_model(tiny_dir("qwen2"))  # attention biases: every kind of layer leaf
    cfg, params = model.config, model.params
    split = unstack_layers(params)
    assert len(split["layers"]) == cfg.num_layers and unstack_layers(split) is split
    for name, stack in params["layers"].items():
        for i, lp in enumerate(split["layers"]):
            np.testing.assert_array_equal(lp[name], stack[i])
    ids, mask = _prompts((40, 25), seed=7)
    stacked, trace = forward_trace(params, cfg, ids, mask)
    got, got_trace = forward_trace(split, cfg, ids, mask)
    # the same float32 products per layer; only XLA's fusion of the loop versus the scan may reorder a sum
    # (relative error ~1e-7 per operation over a few layers of O(1) activations)
    np.testing.assert_allclose(got, stacked, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(got_trace), jax.tree.leaves(trace)):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama2", "mistral"])
def test_prefill_in_causal_blocks_equals_one_block(tiny_dir, family):
    """A prompt's prefill with its queries in causal blocks of 64 (each block reads the keys up to its last query)
    writes the same cache and the same outputs as one block over all keys: the skipped keys are masked, so only
    the order of a few float32 sums can differ (a few ulps of O(1) values); Mistral's sliding window included."""
    from pktjax.model import _run_layers, attention_mask_bias, embed, rope_cos_sin

    model = pktjax.load_model(tiny_dir(family))
    cfg, params = model.config, model.params
    ids, mask = _prompts((200, 131, 37), seed=10)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    cos, sin = rope_cos_sin(cfg, positions)
    bias = attention_mask_bias(cfg, np.arange(ids.shape[1]), mask)
    outs = [_run_layers(params, cfg, embed(params, ids), cos, sin, bias, capture=False,
                        cache=init_cache(cfg, 3, ids.shape[1]), q_block=q) for q in (0, 64)]
    (x0, _, kv0), (x1, _, kv1) = outs
    # the two orders of summation differ by at most the float32 bound of a sum of n terms, n·eps of its magnitude,
    # for the sums over keys (up to t) and features (d) of each layer; a wrong mask or block bound is off by O(1)
    ulps = cfg.num_layers * (ids.shape[1] + cfg.hidden_size) * np.finfo(np.float32).eps
    x0, x1 = np.asarray(x0)[mask > 0], np.asarray(x1)[mask > 0]
    np.testing.assert_allclose(x1, x0, rtol=0, atol=ulps * np.abs(x0).max())
    real = mask > 0  # a padding query attends to nothing real, and its garbage is never read: compare the rest
    for name, axis in (("k", 3), ("v", 4)):  # k [L, B, KV, S, hd], v [L, B, KV, hd, S]
        a, b = (np.moveaxis(np.asarray(c[name]), (1, axis), (0, 1))[real] for c in (kv1, kv0))
        np.testing.assert_allclose(a, b, rtol=0, atol=ulps * np.abs(b).max())


@pytest.mark.parametrize("per_layer", [False, True])
def test_forward_cached_in_pieces_equals_forward(tiny_dir, per_layer):
    """A prompt fed to the KV cache in a chunk and then one token at a time (the same slot for every row) gives the
    logits of one uncached forward over the whole sequence, with stacked or per-layer weights."""
    model = pktjax.load_model(tiny_dir("mistral"))  # GQA + sliding window
    cfg = model.config
    params = unstack_layers(model.params) if per_layer else model.params
    ids, mask = _prompts((30, 22), seed=8)
    want = forward(model.params, cfg, ids, mask)
    cache = init_cache(cfg, 2, 64)
    key_mask = np.pad(mask, ((0, 0), (0, 64 - ids.shape[1])))
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    got, cache = forward_cached(params, cfg, ids[:, :24], positions[:, :24], key_mask, cache)
    pieces = [got]
    for t in range(24, ids.shape[1]):
        got, cache = forward_cached(params, cfg, ids[:, t:t + 1], positions[:, t:t + 1], key_mask, cache)
        pieces.append(got)
    assert int(cache["index"]) == ids.shape[1]
    # same float32 products; the cached sums over keys run over zero-weighted padded slots (exact zeros) and may
    # be ordered differently, so a few ulps of O(1) logits differ
    np.testing.assert_allclose(np.concatenate(pieces, axis=1)[mask > 0], np.asarray(want)[mask > 0],
                               rtol=1e-5, atol=1e-5)


def test_mixed_dtype_products_multiply_in_bfloat16_and_sum_in_float32():
    """float32 activations times bfloat16 weights: the product of the two operands rounded to bfloat16, summed in
    float32 (every product of two bfloat16 numbers is exact in float32), against NumPy in float64; the result is
    float32. The bound is float32's for a sum of ``n`` terms, ``n·eps·Σ|a b|``; rounding the activations or not
    at all would miss it by far (bfloat16 keeps 8 bits)."""
    import jax.numpy as jnp

    from pktjax.model import _dot

    rng = np.random.RandomState(0)
    a = rng.randn(5, 96).astype(np.float32)
    w = jnp.asarray(rng.randn(40, 96).astype(np.float32)).astype(jnp.bfloat16)
    got = _dot("bi,oi->bo", jnp.asarray(a), w)
    assert got.dtype == jnp.float32
    a16 = np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32), np.float64)
    w64 = np.asarray(w.astype(jnp.float32), np.float64)
    want, size = a16 @ w64.T, np.abs(a16) @ np.abs(w64).T
    bound = a.shape[1] * np.finfo(np.float32).eps * size
    assert np.all(np.abs(np.asarray(got, np.float64) - want) <= bound)
    unrounded = np.asarray(a, np.float64) @ w64.T  # the activations not rounded: outside the bound somewhere
    assert np.any(np.abs(unrounded - want) > bound)


def test_bfloat16_matrices_decode_like_their_reference(tiny_dir):
    """``matmul_dtype="bfloat16"``: transposed bfloat16 copies of the linear layers and the head only (norms,
    biases and the embedding table stay float32, and so do the KV cache and the logits); continuous batching gives
    the tokens of the uncached reference with the same matrices, greedy and sampled; float32 changes nothing."""
    import jax.numpy as jnp

    from pktjax.model import InOut, activation_dtype, with_matmul_dtype

    model = pktjax.load_model(tiny_dir("qwen2"))  # tied embeddings; attention biases stay float32
    params = with_matmul_dtype(model.params, "bfloat16")
    q, head = params["layers"]["q_proj"], params["lm_head"]
    assert isinstance(q, InOut) and q.w.dtype == head.w.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(q.w[1].T, np.float32),
                                  np.asarray(model.params["layers"]["q_proj"][1].astype(jnp.bfloat16), np.float32))
    np.testing.assert_array_equal(np.asarray(head.w.T, np.float32),
                                  np.asarray(model.params["embed"].astype(jnp.bfloat16), np.float32))
    assert params["embed"] is model.params["embed"] and params["layers"]["q_bias"].dtype == jnp.float32
    assert activation_dtype(params) == jnp.float32
    split = with_matmul_dtype(unstack_layers(model.params), "bfloat16")
    assert all(isinstance(lp["down_proj"], InOut) and lp["input_norm"].dtype == jnp.float32
               for lp in split["layers"])
    assert with_matmul_dtype(model.params, "float32") is model.params
    ids, mask = _prompts((200, 37, 150, 64, 100), seed=11)
    for kw in (dict(eos_ids=(), pad_id=PAD), dict(eos_ids=(), pad_id=PAD, temperature=1.5, key=jax.random.key(4))):
        got = generate(model.params, model.config, ids, mask, NEW, slots=2, matmul_dtype="bfloat16", **kw)
        ref = generate(model.params, model.config, ids, mask, NEW, use_cache=False, matmul_dtype="bfloat16", **kw)
        np.testing.assert_array_equal(got.tokens, ref.tokens)
    f32 = generate(model.params, model.config, ids, mask, NEW, eos_ids=(), pad_id=PAD)
    again = generate(model.params, model.config, ids, mask, NEW, eos_ids=(), pad_id=PAD, matmul_dtype="float32")
    np.testing.assert_array_equal(again.tokens, f32.tokens)
    logits32 = np.asarray(forward(model.params, model.config, ids, mask))[mask > 0]
    logits16 = forward(params, model.config, ids, mask)
    assert logits16.dtype == jnp.float32
    assert 0 < np.abs(np.asarray(logits16)[mask > 0] - logits32).max() < 0.1 * np.abs(logits32).max()
