"""MMLU limits stratified across subjects, and the prompt-format setting: the paper's format or the model's own
chat template (from the tokenizer, or a GGUF file's metadata)."""

import collections

import pytest

from pktjax.errors import ConfigError, PktjaxError
from pktjax.evaluate import evaluate
from pktjax.tasks import gsm8k, mmlu
from pktjax.tasks.common import chat_template_prompt
from pktjax.tokenizer import load_tokenizer

TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}[/{{ m['role'] }}]{% endfor %}"
            "{% if add_generation_prompt %}[assistant]{% endif %}")


def test_mmlu_limit_is_stratified_across_subjects():
    whole = mmlu.load()
    subjects = sorted({ex["subject"] for ex in whole})
    assert len(whole) == 14042 and len(subjects) == 57
    for limit in (10, 64, 200):
        part = mmlu.load(limit)
        counts = collections.Counter(ex["subject"] for ex in part)
        assert len(part) == limit and len(counts) == min(limit, 57)
        assert max(counts.values()) - min(counts.values()) <= 1  # as even as the limit allows
        if limit < 57:
            assert sorted(counts) == subjects[:limit]  # the first subjects alphabetically
        by_id = {ex["id"]: ex for ex in whole}
        assert all(by_id[ex["id"]] == ex for ex in part)  # the same questions, under the same ids
        positions = [int(ex["id"].rsplit("/", 1)[1]) for ex in part]
        assert positions == sorted(positions)  # kept in the file's order
        for s in counts:  # each subject's first questions, in order
            first = [ex["id"] for ex in whole if ex["subject"] == s][:counts[s]]
            assert [ex["id"] for ex in part if ex["subject"] == s] == first


def test_chat_template_prompts_carry_the_same_turns(tiny_dir):
    tok = load_tokenizer(tiny_dir("llama2"))
    tok.chat_template = TEMPLATE
    ex = gsm8k.load(1)[0]
    shots = gsm8k.shots(2)
    got = gsm8k.prompt(ex, shots, chat_template_prompt(tok))
    want = "".join(f"[user]{u}[/user][assistant]{a}[/assistant]" for u, a in shots)
    want += f"[user]{gsm8k.INSTRUCTION}Question: {ex['question'].strip()}[/user][assistant]Answer:"
    assert got == want
    seen = []

    def capture(prompts, n, stop):
        seen.extend(prompts)
        return ["The answer is 3."] * len(prompts)

    rep = evaluate(None, "gsm8k", limit=2, few_shot=2, generator=capture, tokenizer=tok, prompt_format="chat_template")
    assert seen[0] == want and rep["settings"]["prompt_format"] == "chat_template"
    assert rep["settings"]["add_special_tokens"] is False  # the template brings its own special tokens
    paper = evaluate(None, "gsm8k", limit=1, generator=lambda ps, n, s: ["1"], tokenizer=tok)
    assert paper["records"][0]["prompt"] == gsm8k.prompt(ex, []) and "<|user|>" in paper["records"][0]["prompt"]


def test_mmlu_scores_under_the_chat_template_on_a_tiny_model(tiny_dir):
    folder = tiny_dir("llama2")
    tok = load_tokenizer(folder)
    tok.chat_template = TEMPLATE
    rep = evaluate(str(folder), "mmlu", limit=4, batch_size=4, tokenizer=tok, prompt_format="chat_template")
    assert rep["n"] == 4 and all(r["prompt"].startswith("[user]The following are multiple choice questions")
                                 and r["prompt"].endswith("[assistant]" + mmlu.ASSISTANT_PREFIX)
                                 for r in rep["records"])
    assert all(abs(sum(r["probs"].values()) - 1) < 1e-4 for r in rep["records"])


def test_a_gguf_files_chat_template_is_used_when_the_tokenizer_has_none(tiny_dir, tmp_path):
    from gguf import GGUFWriter

    path = tmp_path / "meta.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_chat_template(TEMPLATE)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok = load_tokenizer(tiny_dir("llama2"))
    tok.chat_template = None
    assert chat_template_prompt(tok, str(path))([("user", "hi")], "A:") == "[user]hi[/user][assistant]A:"
    with pytest.raises(ConfigError, match="has no chat template"):
        chat_template_prompt(tok)


def test_bad_prompt_settings_are_refused():
    with pytest.raises(PktjaxError, match="choose one of paper, chat_template"):
        evaluate(None, "gsm8k", generator=lambda *a: [], prompt_format="native")
    with pytest.raises(PktjaxError, match="needs the model's tokenizer"):
        evaluate(None, "gsm8k", limit=1, generator=lambda *a: [], prompt_format="chat_template")
