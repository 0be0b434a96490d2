"""Greedy decoding with drafts: whatever the guesses, the tokens are those of decoding without them."""

import importlib

import numpy as np
import pytest

import pktjax
from pktjax.generate import generate
from tests.test_generate import NEW, PAD, _hf_generate, _prompts, stop_case
from tests.tiny import VOCAB

G = importlib.import_module("pktjax.generate")  # the module (the package's ``generate`` is the function)
TRUSTED = 1e-4  # a margin far above float32 rounding of the tiny models' logits (see below)


def _drafts(base, seed=0):
    """One draft of every kind per row: the true continuation, it cut short, one token changed, random tokens,
    none, and the true continuation run on past its end."""
    rng = np.random.RandomState(seed)
    kinds = []
    for r, (toks, n) in enumerate(zip(base.tokens, base.lengths)):
        true = toks[:n].tolist()
        k = r % 6
        if k == 0:
            kinds.append(true)
        elif k == 1:
            kinds.append(true[:max(1, n // 2)])
        elif k == 2:
            changed = list(true)
            changed[n // 3] = (changed[n // 3] + 7) % VOCAB
            kinds.append(changed)
        elif k == 3:
            kinds.append(rng.randint(4, VOCAB, size=n).tolist())
        elif k == 4:
            kinds.append(None)
        else:
            kinds.append(true + rng.randint(4, VOCAB, size=5).tolist())
    return kinds


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_drafts_do_not_change_the_tokens(tiny_dir, family, monkeypatch):
    """Seven prompts in two slots, rows ending at an EOS that is a frequent token, every kind of draft, and the
    margin below which the decode step decides near 0 (the prefill decides almost all), at the median margin (a
    mix) and at infinity (the decode step decides all): the tokens equal decoding without drafts and
    transformers'."""
    folder = tiny_dir(family)
    model = pktjax.load_model(folder)
    ids, mask = _prompts((200, 37, 150, 64, 100, 180, 12), seed=3)
    free = generate(model.params, model.config, ids, mask, NEW, eos_ids=(), pad_id=PAD)
    stop_tok = int(free.tokens[1, 3])
    kw = dict(eos_ids=(stop_tok,), pad_id=PAD, slots=2)
    base = generate(model.params, model.config, ids, mask, NEW, **kw)
    np.testing.assert_array_equal(base.tokens, _hf_generate(folder, ids, mask, eos=stop_tok))
    drafts = _drafts(base)
    # the smallest margin is not 0: logits of the prefill and of the decode step differ by float32 rounding
    # (about 1e-6 here: |logit| < 10, d = 32, 2 layers, relative error ~1e-7 per operation), so the prefill is
    # trusted only 100x above that, and the test does not hang on one CPU's summation order at a near-tie
    for margin in (TRUSTED, 0.05, float("inf")):
        monkeypatch.setattr(G, "DRAFT_MARGIN", margin)
        stats = {}
        out = generate(model.params, model.config, ids, mask, NEW, drafts=drafts, stats=stats, **kw)
        np.testing.assert_array_equal(out.tokens, base.tokens, err_msg=f"margin {margin}")
        np.testing.assert_array_equal(out.lengths, base.lengths)
        assert out.finish == base.finish
        assert stats["draft_tokens"] == sum(min(len(d or ()), NEW - 1) for d in drafts)


def test_good_drafts_replace_decode_steps(tiny_dir, monkeypatch):
    """With every row's own continuation as its draft (all but the last token, which the model picks) and every
    margin above float32 rounding trusted, the prefill writes whole rows: no decode step, against one per token after the first without
    drafts. (At the default margin a tiny random model's near-ties go to the decode step.)"""
    monkeypatch.setattr(G, "DRAFT_MARGIN", TRUSTED)
    model = pktjax.load_model(tiny_dir("llama2"))
    ids, mask = _prompts((200, 37, 150, 64), seed=6)
    kw = dict(eos_ids=(), pad_id=PAD, slots=4)
    plain_stats, stats = {}, {}
    base = generate(model.params, model.config, ids, mask, NEW, stats=plain_stats, **kw)
    drafts = [t.tolist() for t in base.tokens]
    out = generate(model.params, model.config, ids, mask, NEW, drafts=drafts, stats=stats, **kw)
    np.testing.assert_array_equal(out.tokens, base.tokens)
    assert stats["draft_agreed"] == stats["draft_tokens"] == 4 * (NEW - 1)
    assert plain_stats["busy_slot_steps"] == 4 * (NEW - 1) and stats["busy_slot_steps"] == 0


def test_drafts_with_stop_strings_keep_the_texts(tiny_dir):
    model, tok, ids, mask, _, stop = stop_case(tiny_dir)
    kw = dict(stop=[stop], eos_ids=(), pad_id=PAD, tokenizer=tok, chunk=4, slots=2)
    base = generate(model.params, model.config, ids, mask, NEW, **kw)
    # drafts as an evaluation makes them: the text of a completion (cut before its stop string), tokenized again
    drafts = [tok(t, add_special_tokens=False)["input_ids"] for t in base.texts]
    out = generate(model.params, model.config, ids, mask, NEW, drafts=drafts, **kw)
    assert out.texts == base.texts and out.finish == base.finish
    np.testing.assert_array_equal(out.tokens, base.tokens)


def test_bad_drafts_are_refused(tiny_dir):
    model = pktjax.load_model(tiny_dir("llama2"))
    ids, mask = _prompts((20, 10), seed=1)
    with pytest.raises(ValueError, match="greedy"):
        generate(model.params, model.config, ids, mask, 4, drafts=[[5], [6]], temperature=1.0,
                 key=__import__("jax").random.key(0))
    with pytest.raises(ValueError, match="one per prompt"):
        generate(model.params, model.config, ids, mask, 4, drafts=[[5]])


@pytest.mark.parametrize("n, window", [(1, 64), (2, 128), (8, 64), (24, 64)])
def test_verify_choice_and_margin_match_numpy(tiny_dir, n, window):
    """The prefill's check of a draft: at every position the argmax of the logits and its margin over the
    runner-up, against NumPy's sort of the same logits; ties (a repeated largest logit) give margin 0."""
    model = pktjax.load_model(tiny_dir("qwen2"))
    assert window % G._verify_chunk(n) == 0
    x = np.random.RandomState(n).normal(size=(n, window, model.config.hidden_size)).astype(np.float32)
    x[0, 3] = x[0, 2]  # two equal positions: the same choice and margin
    best, margin = (np.asarray(a) for a in G._top2(model.params, model.config, x))
    # reference in float64: the final norm, the head, NumPy's sort. In float32 the norm's sum of d squares, rsqrt
    # and two products put a relative error of at most (d/2 + 4) eps on each normed entry, and the head's sums add
    # d eps: each logit is off by at most (1.5 d + 4) eps sum_i |x_i w_i|, a margin by twice that
    p, eps, d = model.params, np.finfo(np.float32).eps, x.shape[-1]
    x64 = x.astype(np.float64)
    xn = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + model.config.rms_norm_eps) * np.asarray(p["final_norm"])
    head = np.asarray(p.get("lm_head", p["embed"]), np.float64)
    logits, bound = xn @ head.T, 2 * (1.5 * d + 4) * eps * (np.abs(xn) @ np.abs(head).T).max()
    top2 = np.sort(logits, axis=-1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > bound  # no near-tie that float32 rounding could reorder
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(best[clear], logits.argmax(-1)[clear])
    np.testing.assert_allclose(margin, top2[..., 1] - top2[..., 0], rtol=0, atol=bound)
    assert best[0, 2] == best[0, 3] and margin[0, 2] == margin[0, 3]

    tied = model.params | {"final_norm": np.ones_like(model.params["final_norm"])}
    head = np.asarray(tied.get("lm_head", tied["embed"])).copy()
    head[9] *= 4.0  # longer than every other row: along it, its logit is the largest
    head[5] = head[9]  # tokens 5 and 9 now have equal logits everywhere
    tied = tied | ({"lm_head": head} if "lm_head" in tied else {"embed": head})
    x0 = np.repeat(head[9][None, None], n, axis=0).repeat(window, axis=1)
    best, margin = (np.asarray(a) for a in G._top2(tied, model.config, x0))
    assert (best == 5).all() and (margin == 0).all()  # the first of the tied (argmax), and no margin
