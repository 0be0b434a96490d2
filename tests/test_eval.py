"""Benchmark scoring: canonical code passes and corrupted code fails in the sandbox, GSM8K answer extraction,
MMLU letter scoring and prompt formats, and evaluate / `pktjax eval` end to end on a tiny model."""

import json
import math
import re

import numpy as np
import pytest

from pktjax import sandbox
from pktjax.cli import main as cli_main
from pktjax.data import data_root
from pktjax.errors import PktjaxError
from pktjax.evaluate import evaluate
from pktjax.tasks import gsm8k, humaneval, mbpp, mmlu
from pktjax.tasks.common import mcnemar_exact, wilson_interval


# ------------------------------------------------------------------------------------------------ code tasks

def test_humaneval_canonical_solutions_all_pass():
    problems = humaneval.load()
    assert len(problems) == 164
    results = sandbox.run_many([humaneval.program(p, p["canonical_solution"]) for p in problems], workers=8)
    failed = [(p["id"], r.killed, r.stderr[-200:]) for p, r in zip(problems, results) if not r.ok]
    assert failed == []


@pytest.mark.parametrize("corrupt", ["    return None\n", "    raise NotImplementedError\n",
                                     "    while True:\n        pass\n", "drop_last_line"])
def test_humaneval_corrupted_solutions_fail(corrupt):
    problems = humaneval.load()[::8]  # 21 problems, spread over the set
    if corrupt == "drop_last_line":  # the canonical body minus its final statement (usually the return)
        bodies = ["\n".join(p["canonical_solution"].rstrip().splitlines()[:-1]) + "\n    pass\n" for p in problems]
    else:
        bodies = [corrupt] * len(problems)
    results = sandbox.run_many([humaneval.program(p, b) for p, b in zip(problems, bodies)], workers=8, timeout=2)
    passed = [p["id"] for p, r in zip(problems, results) if r.ok]
    assert passed == []
    if "while" in corrupt:
        assert all(r.killed in ("timeout", "cpu") for r in results)


def test_humaneval_completion_extraction():
    p = humaneval.load(limit=1)[0]
    completion = p["canonical_solution"] + "```\nSome prose"
    assert humaneval.extract_code(p, completion) == p["prompt"] + p["canonical_solution"]
    restarted = "from typing import List\n\ndef has_close_elements(numbers, threshold):\n    return False\n"
    assert humaneval.extract_code(p, restarted).endswith(restarted)


def test_mbpp_reference_solutions_pass_on_test_split():
    rows = mbpp.load()
    assert len(rows) == 500 and rows[0]["task_id"] == 11 and rows[-1]["task_id"] == 510
    subset = rows[::5]  # 100 problems
    results = sandbox.run_many([mbpp.program(r, r["code"]) for r in subset], workers=8)
    assert [(r["id"], res.stderr[-200:]) for r, res in zip(subset, results) if not res.ok] == []
    wrong = sandbox.run_many([mbpp.program(r, r["code"].replace("return", "return None and", 1))
                              for r in subset[:20] if "return" in r["code"]], workers=8)
    assert sum(res.ok for res in wrong) == 0


def test_mbpp_prompt_matches_laten_format():
    by_text = {}
    for r in mbpp._all(hub=False):
        by_text.setdefault(r["text"], []).append(r)
    seen = 0
    with open(data_root() / "laten" / "mbpp" / "mbpp_train_split.jsonl") as fh:
        for line in list(fh)[:60]:
            user = json.loads(line)["messages"][0]["content"]
            cands = by_text.get(user[len(mbpp.INSTRUCTION):].split("\n")[0], [])
            if cands:
                seen += 1
                assert user in [mbpp._user(c) for c in cands]
    assert seen >= 30
    prompt = mbpp.prompt(mbpp.load(limit=1)[0], mbpp.shots(3))
    assert prompt.count("<|user|>") == 4 and prompt.endswith("<|assistant|>\n" + mbpp.ANSWER_PREFIX)
    assert mbpp.extract_code("```python\nx = 1\n```\ntext") == "x = 1\n"


# ------------------------------------------------------------------------------------------------ GSM8K

def test_gsm8k_extraction_on_all_reference_answers():
    rows = gsm8k.load()
    assert len(rows) == 1319
    for r in rows:
        assert gsm8k.extract_answer(r["answer"]) == r["gold"], r["answer"][-60:]
        rationale = re.sub(r"<<[^>]*>>", "", r["answer"].split("####")[0]).replace("\n", " ").strip()
        laten_style = f"{rationale} So the answer is {r['answer'].split('####')[-1].strip()}."
        assert gsm8k.score(r, laten_style)["correct"], laten_style[-60:]
        bare = r["answer"].replace("####", "")  # no marker: the last number counts
        assert gsm8k.same_number(gsm8k.extract_answer(bare), r["gold"])


def test_gsm8k_scoring_cases():
    ex = {"gold": "1234"}
    assert gsm8k.score(ex, " 1,000 + 234 = 1,234. So the answer is 1,234.")["correct"]
    assert gsm8k.score(ex, " The answer is $1234.00")["correct"]
    assert not gsm8k.score(ex, " So the answer is 1235. Then 1234")["correct"]
    assert not gsm8k.score(ex, " I do not know")["correct"]
    assert gsm8k.score({"gold": "-3"}, "It drops by 3, so the answer is -3.")["correct"]
    assert gsm8k.score({"gold": "0.5"}, "So the answer is .5")["correct"]


def test_gsm8k_prompt_matches_laten_format():
    with open(data_root() / "laten" / "gsm" / "gsm_train_split.jsonl") as fh:
        msgs = json.loads(fh.readline())["messages"]
    question = msgs[0]["content"].split("Question: ", 1)[1]
    assert gsm8k.prompt({"question": question}, []) == f"<|user|>\n{msgs[0]['content']}\n\n<|assistant|>\nAnswer:"
    assert msgs[1]["content"].startswith("Answer:")
    two_shot = gsm8k.prompt({"question": question}, gsm8k.shots(2))
    assert two_shot.count("<|user|>") == 3 and two_shot.count("So the answer is") >= 2


# ------------------------------------------------------------------------------------------------ MMLU

def test_mmlu_picks_the_gold_letter_when_its_logit_is_highest():
    rng = np.random.RandomState(0)
    choice_ids = [40, 41, 42, 43]
    for gold_idx, letter in enumerate(mmlu.LETTERS):
        for _ in range(25):
            logits = rng.normal(size=260)
            logits[choice_ids[gold_idx]] = logits[choice_ids].max() + 0.01
            logits[7] = logits.max() + 5  # a higher non-answer token does not count
            pred, probs = mmlu.pick_letter(logits, choice_ids)
            assert pred == letter and np.isclose(probs.sum(), 1) and probs.argmax() == gold_idx
            assert mmlu.score({"gold": letter}, pred)["correct"]


def test_mmlu_data_and_prompt_format():
    rows = mmlu.load()
    assert len(rows) == 14042 and {r["gold"] for r in rows} == set("ABCD")
    ours = {mmlu.prompt(r, []) for r in rows}
    matched = 0
    with open(data_root() / "laten" / "mmlu" / "mmlu_train_split.jsonl") as fh:
        for line in fh:
            user = json.loads(line)["messages"][0]["content"]
            matched += f"<|user|>\n{user}\n\n<|assistant|>\n{mmlu.ASSISTANT_PREFIX}" in ours
    assert matched >= 5  # LaTen questions that are also in the test set are formatted identically
    ex = rows[0]
    five = mmlu.prompt(ex, mmlu.dev_exemplars(ex["subject"]))
    assert five.count("\nAnswer: ") == 5 and five.endswith("\nAnswer:\n\n<|assistant|>\nThe answer is:")


def test_wilson_interval():
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)


def test_mcnemar_exact_against_the_binomial_distribution():
    def by_enumeration(b, c):  # P of every split of the n discordant examples at most as likely as the observed one
        n = b + c
        probs = [math.comb(n, k) / 2 ** n for k in range(n + 1)]
        return min(1.0, sum(q for q in probs if q <= probs[b] * (1 + 1e-12)))

    for b, c in [(0, 0), (1, 0), (0, 5), (2, 7), (10, 3), (6, 6), (0, 20)]:
        assert mcnemar_exact(b, c) == pytest.approx(by_enumeration(b, c), rel=1e-12)
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)  # 0.0625: five losses alone are not significant at 5%
    with pytest.raises(ValueError, match="negative"):
        mcnemar_exact(-1, 2)


# ------------------------------------------------------------------------------------------------ end to end

def test_evaluate_code_tasks_with_given_completions(tmp_path):
    problems = {p["id"]: p for p in humaneval.load(limit=6)}

    def canonical(prompts, max_new, stop):
        assert "```" in stop
        return [next(p["canonical_solution"] for p in problems.values() if q.endswith(p["prompt"])) for q in prompts]

    report = evaluate(None, "humaneval", limit=6, generator=canonical, out=tmp_path / "he.json")
    assert report["score"] == 1.0 and report["n"] == 6 and all(r["verdict"] == "passed" for r in report["records"])
    assert json.loads((tmp_path / "he.json").read_text())["n_correct"] == 6
    bad = evaluate(None, "humaneval", limit=6, generator=lambda ps, n, s: ["    return 42\n"] * len(ps))
    assert bad["score"] == 0.0 and bad["ci95"][0] == 0.0 and bad["records"][0]["verdict"].startswith("failed")
    rows = {r["id"]: r for r in mbpp.load(limit=4)}
    report = evaluate(None, "mbpp", limit=4, generator=lambda ps, n, s: [r["code"] + "\n```" for r in rows.values()])
    assert report["score"] == 1.0 and report["settings"]["sandbox"] and report["records"][0]["program"]


def test_evaluate_and_cli_on_a_tiny_model(tiny_dir, tmp_path, capsys):
    folder = tiny_dir("llama2")
    # batch 4 / length 256 / 24 new tokens: the buckets that test_generate compiles for this model
    report = evaluate(str(folder), "gsm8k", limit=3, max_new_tokens=24, batch_size=4, out=tmp_path / "gsm.json")
    assert report["n"] == 3 and len(report["records"]) == 3 and 0 <= report["ci95"][0] <= report["ci95"][1] <= 1
    rec = report["records"][0]
    assert rec["prompt"].endswith("<|assistant|>\nAnswer:") and isinstance(rec["output"], str) and "gold" in rec
    assert json.loads((tmp_path / "gsm.json").read_text())["settings"]["max_new_tokens"] == 24
    for shots in (0, 5):
        rep = evaluate(str(folder), "mmlu", limit=4, few_shot=shots, batch_size=4)
        assert rep["n"] == 4 and all(abs(sum(r["probs"].values()) - 1) < 1e-4 for r in rep["records"])
        assert all(r["output"] in "ABCD" for r in rep["records"])
    out = tmp_path / "cli.json"
    assert cli_main(["eval", "--model", str(folder), "--task", "mmlu", "--limit", "4", "--batch-size", "4",
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "score" in printed and "95% CI" in printed and json.loads(out.read_text())["task"] == "mmlu"


def test_an_interrupted_evaluation_resumes_from_its_finished_batches(tiny_dir, tmp_path):
    folder, partial = str(tiny_dir("llama2")), tmp_path / "gsm.partial.jsonl"
    kw = dict(limit=3, max_new_tokens=24, batch_size=2)
    whole = evaluate(folder, "gsm8k", **kw)

    def stop_after_first_batch(n):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate(folder, "gsm8k", resume=partial, progress=stop_after_first_batch, **kw)
    assert len(partial.read_text().splitlines()) == 2  # the first batch was kept
    seen = []
    resumed = evaluate(folder, "gsm8k", resume=partial, progress=seen.append, **kw)
    assert seen == [2, 1]  # two completions reused, one decoded
    assert [r["output"] for r in resumed["records"]] == [r["output"] for r in whole["records"]]
    assert len(partial.read_text().splitlines()) == 3


def test_drafts_from_an_earlier_report_keep_the_completions(tiny_dir, tmp_path, capsys):
    """A model evaluated with another model's report as drafts writes its own completions; with its own report
    as drafts every draft token it was given is kept (each draft is checked by the prefill)."""
    a, b = str(tiny_dir("llama2")), str(tiny_dir("llama2", seed=1))
    kw = dict(limit=3, max_new_tokens=24, batch_size=4)
    ref_a = evaluate(a, "gsm8k", out=tmp_path / "a.json", **kw)
    plain_b = evaluate(b, "gsm8k", **kw)
    drafted_b = evaluate(b, "gsm8k", drafts=tmp_path / "a.json", **kw)
    assert [r["output"] for r in drafted_b["records"]] == [r["output"] for r in plain_b["records"]]
    assert drafted_b["settings"]["drafts"] == str(tmp_path / "a.json")
    own = evaluate(a, "gsm8k", drafts={r["prompt"]: r["output"] for r in ref_a["records"]}, **kw)
    assert [r["output"] for r in own["records"]] == [r["output"] for r in ref_a["records"]]
    kept = own["settings"]["drafts_kept"]
    assert kept["prompts"] == sum(bool(r["output"]) for r in ref_a["records"]) and kept["tokens"] > 0
    with pytest.raises(PktjaxError, match="not on 'humaneval'"):
        evaluate(a, "humaneval", drafts=tmp_path / "a.json", **kw)
    with pytest.raises(PktjaxError, match="scored from logits"):
        evaluate(a, "mmlu", limit=2, drafts=tmp_path / "a.json")
    assert cli_main(["eval", "--model", b, "--task", "gsm8k", "--limit", "3", "--max-new-tokens", "24",
                     "--batch-size", "4", "--drafts", str(tmp_path / "a.json"), "--out", str(tmp_path / "b.json")]) == 0
    assert [r["output"] for r in json.loads((tmp_path / "b.json").read_text())["records"]] == \
        [r["output"] for r in plain_b["records"]]


def test_evaluate_with_bfloat16_matrices(tiny_dir, tmp_path):
    """``matmul_dtype``: recorded in the report's settings, given to every product of a generation and a choice
    task (MMLU's answer probabilities move, within bfloat16's rounding), and checked before any model is read."""
    folder = tiny_dir("llama2")
    kw = dict(limit=3, max_new_tokens=24, batch_size=4)
    rep = evaluate(str(folder), "gsm8k", matmul_dtype="bfloat16", out=tmp_path / "gsm.json", **kw)
    assert rep["n"] == 3 and json.loads((tmp_path / "gsm.json").read_text())["settings"]["matmul_dtype"] == "bfloat16"
    assert "matmul_dtype" not in evaluate(str(folder), "gsm8k", **kw)["settings"]
    p32, p16 = ([r["probs"] for r in evaluate(str(folder), "mmlu", limit=4, batch_size=4, **x)["records"]]
                for x in ({}, {"matmul_dtype": "bfloat16"}))
    # bfloat16 operands keep 8 significant bits: the probabilities move (0.013 at most here), but by a perturbation,
    # not a different model (the products' arithmetic itself is checked in test_generate against NumPy)
    diff = max(abs(a[k] - b[k]) for a, b in zip(p32, p16) for k in a)
    assert 0 < diff < 0.05, diff
    with pytest.raises(PktjaxError, match="matmul_dtype 'float16'"):
        evaluate(str(tmp_path / "no-model"), "gsm8k", matmul_dtype="float16")
    assert cli_main(["eval", "--model", str(folder), "--task", "mmlu", "--limit", "2", "--batch-size", "4",
                     "--matmul-dtype", "bfloat16", "--out", str(tmp_path / "cli.json")]) == 0
    assert json.loads((tmp_path / "cli.json").read_text())["settings"]["matmul_dtype"] == "bfloat16"
