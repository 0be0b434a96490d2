"""Benchmark evaluation (SPEC §5): GSM8K, MMLU, HumanEval and MBPP with a JSON report.

``evaluate(model_or_path, task)`` loads the benchmark from ``data_root()/benchmarks`` (or the hub with
``hub=True``), builds the chat prompts of :mod:`pktjax.tasks`, decodes greedily with the KV cache (or scores the
answer letter from logits for MMLU), scores every example, and returns a report::

    {"task", "score", "ci95": [lo, hi], "ci_method": "wilson", "n", "n_correct", "settings": {...},
     "records": [{"id", "prompt", "output", "verdict", "correct", ...}, ...], "seconds",
     "provenance": {...}}   # versions, commit, devices, config and data hashes (pktjax.provenance)

Generated code runs only through :func:`pktjax.sandbox.run`.
"""

from __future__ import annotations

import json
import os
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pktjax import sandbox
from pktjax.checkpoint import Model, load_model
from pktjax.errors import DataError, PktjaxError
from pktjax.generate import generate_text, round_batch, round_length
from pktjax.model import hidden_states, unembed, with_matmul_dtype
from pktjax.provenance import provenance
from pktjax.runfolder import append_jsonl, fault_point, read_json, read_jsonl, sha256_bytes, write_json
from pktjax.samples import has_samples, pass_at_ks, read_samples, samples_path, write_samples
from pktjax.settings import DTYPES
from pktjax.tasks import get_task
from pktjax.tasks.common import PROMPT_FORMATS, chat_prompt, chat_template_prompt, wilson_interval
from pktjax.tokenizer import load_tokenizer

Generator = Callable[[Sequence[str], int, Sequence[str]], Sequence[str]]
Progress = Callable[[int], None]


def evaluate(model_or_path: Model | str | os.PathLike | None, task: str, limit: int | None = None,
             few_shot: int = 0, batch_size: int = 8, out: str | os.PathLike | None = None, *,
             tokenizer=None, max_new_tokens: int | None = None, hub: bool = False,
             generator: Generator | None = None, timeout: float = 10.0, workers: int | None = None,
             add_special_tokens: bool = True, progress: Progress | None = None,
             resume: str | os.PathLike | None = None, num_samples: int = 0, temperature: float = 0.8,
             pass_k: Sequence[int] = (1, 10), seed: int = 0, prompt_format: str = "paper",
             drafts: Mapping[str, str] | str | os.PathLike | None = None,
             matmul_dtype: str | None = None) -> dict[str, Any]:
    """Evaluate a model on ``task`` (``gsm8k``, ``mmlu``, ``humaneval``, ``mbpp``) and return the report.

    ``model_or_path``: a :class:`~pktjax.checkpoint.Model` or a checkpoint path (its tokenizer is read from the
    same folder unless ``tokenizer`` is given). ``limit``: first N examples. ``few_shot``: exemplars per prompt
    (MMLU: dev questions of the subject; GSM8K: LaTen train examples; MBPP: the prompt split). ``generator``:
    optional ``(prompts, max_new_tokens, stop) -> completions`` used instead of the model (e.g. to score saved
    outputs); ``timeout``: seconds per program in the sandbox; ``progress(n)`` is called as examples finish.
    ``out``: write the report there as JSON. ``resume``: a JSONL file of finished completions (generation tasks):
    each completion is appended as it finishes, and a later call with the same file decodes only the prompts it
    lacks (the pass@k draws too, see ``num_samples``). ``batch_size``: decode slots (continuous batching) or forward batch (choice tasks).

    Code tasks write their greedy completions as a ``human-eval`` / EvalPlus samples file beside ``out``
    (:func:`pktjax.samples.samples_path`). ``num_samples = n > 0`` (generation tasks) also draws ``n``
    completions per problem at ``temperature`` (PRNG ``seed``) and reports the unbiased pass@k for each ``k`` of
    ``pass_k`` up to ``n`` under ``"pass_at_k"``, beside the greedy score; draw ``j`` of problem ``i`` samples
    with a key made from ``seed`` and ``i * n + j`` alone, and with ``resume`` each draw is kept as it finishes,
    so an interrupted evaluation goes on with the draws it lacks and ends with the same samples. ``prompt_format``: ``"paper"`` (the
    LaTen ``<|user|>`` format of :mod:`pktjax.tasks`) or ``"chat_template"`` (the same turns in the model's own
    chat template, from its tokenizer or GGUF metadata; the template brings its own special tokens, so
    ``add_special_tokens`` is then off).

    ``drafts`` (generation tasks): guesses of the greedy completions, ``{prompt: text}`` or the path of an earlier
    report on the same task (its records' outputs, e.g. the base student's when evaluating a student made from
    it). Each prompt's guess is checked by the prefill and decoding goes on after the part the model confirms
    (:func:`pktjax.generate.generate`'s ``drafts``): the completions are the model's own, only cheaper to make
    when the guesses are close. The report's settings name the drafts and how many of their tokens were kept.

    ``matmul_dtype`` (``"bfloat16"``): multiply by bfloat16 copies of the weight matrices, activations, sums, norms
    and logits staying float32 (:func:`pktjax.model.with_matmul_dtype`): half the bytes per decode step, and the
    CPU's bfloat16 units where it has them (AMX, AVX512-BF16); the scores are not float32's. Recorded in the
    report's settings. Default: the weights' own dtype.
    """
    start = time.time()
    mod = get_task(task)
    if num_samples > 0 and mod.KIND == "choice":
        raise PktjaxError(f"{task} is scored from logits; num_samples (pass@k) applies to generation tasks.")
    if num_samples > 0 and temperature <= 0:
        raise PktjaxError(f"pass@k from {num_samples} samples needs a temperature > 0 (got {temperature}); the "
                          "greedy completion is already scored as pass@1.")
    if drafts is not None and mod.KIND == "choice":
        raise PktjaxError(f"{task} is scored from logits; drafts apply to generation tasks.")
    if matmul_dtype is not None and matmul_dtype not in DTYPES:
        raise PktjaxError(f"matmul_dtype {matmul_dtype!r}: choose one of {', '.join(DTYPES)}.")
    if prompt_format not in PROMPT_FORMATS:
        raise PktjaxError(f"prompt_format {prompt_format!r}: choose one of {', '.join(PROMPT_FORMATS)}.")
    examples = mod.load(limit, hub=hub)
    if not examples:
        raise PktjaxError(f"{task}: no examples to evaluate (limit={limit}).")
    model, tok = _resolve_model(model_or_path, tokenizer, generator)
    if matmul_dtype is not None and model is not None:
        model = model.replace(params=with_matmul_dtype(model.params, matmul_dtype))
    render = chat_prompt
    if prompt_format == "chat_template":
        if tok is None:
            raise PktjaxError("prompt_format='chat_template' needs the model's tokenizer (pass tokenizer=).")
        render = chat_template_prompt(tok, model.source if model is not None else None)
        add_special_tokens = False
    settings = {"task": task, "model": _model_name(model_or_path), "limit": limit, "few_shot": few_shot,
                "batch_size": batch_size, "hub": hub, "add_special_tokens": add_special_tokens, "decoding": "greedy",
                "prompt_format": prompt_format}
    if matmul_dtype is not None:
        settings["matmul_dtype"] = matmul_dtype
    if drafts is not None:
        settings["drafts"] = "given" if isinstance(drafts, Mapping) else str(drafts)
    progress = progress or (lambda n: None)
    if mod.KIND == "choice":
        records = _run_choice(mod, examples, few_shot, model, tok, batch_size, add_special_tokens, hub, progress,
                              render)
        settings["scoring"] = "argmax of the answer-letter logits at the next position"
    else:
        max_new = max_new_tokens or mod.MAX_NEW_TOKENS
        settings.update(max_new_tokens=max_new, stop=list(mod.STOP))
        exemplars = mod.shots(few_shot, hub)
        prompts = [mod.prompt(ex, exemplars, render) for ex in examples]
        guesses = _read_drafts(drafts, task)
        finished = _Finished(resume)
        outputs = _complete(prompts, max_new, mod.STOP, model, tok, generator, batch_size, add_special_tokens,
                            progress, finished, guesses, settings)
        records = _score_generations(mod, examples, prompts, outputs, timeout, workers, settings)
        if has_samples(mod) and out is not None:
            settings["samples_file"] = str(write_samples(samples_path(out), [mod.to_sample(ex, o) for ex, o in
                                                                             zip(examples, outputs)]))
    sampled = None
    if num_samples > 0:
        sampled = _pass_at_k(mod, examples, prompts, num_samples, temperature, seed, pass_k, model, tok, generator,
                             batch_size, add_special_tokens, max_new, timeout, workers, progress, records, out,
                             finished)
    report = _report(task, records, settings, time.time() - start)
    report["provenance"] = provenance(settings, [] if hub else mod.data_files(examples, few_shot))
    if sampled is not None:
        report["pass_at_k"] = sampled
    if out is not None:
        write_report(report, out)
    return report


# ------------------------------------------------------------------------------------------------ model side

def _resolve_model(model_or_path, tokenizer, generator):
    if generator is not None and model_or_path is None:
        return None, tokenizer
    if model_or_path is None:
        raise PktjaxError("evaluate: give a model (or a checkpoint path), or a generator for the completions.")
    if isinstance(model_or_path, Model):
        model = model_or_path
    else:
        model = load_model(model_or_path)
    if tokenizer is None:
        if model.source is None:
            raise PktjaxError("evaluate: this Model has no source folder to read a tokenizer from; pass tokenizer=.")
        tokenizer = load_tokenizer(model.source)
    return model, tokenizer


def _model_name(m) -> str | None:
    if m is None:
        return None
    return str(m.source) if isinstance(m, Model) else str(m)


def _order_by_length(tok, prompts: Sequence[str], add_special_tokens: bool) -> tuple[list[int], list[list[int]]]:
    """Token ids of every prompt, and an order that batches prompts of similar length together."""
    ids = [list(tok(p, add_special_tokens=add_special_tokens)["input_ids"]) for p in prompts]
    return sorted(range(len(ids)), key=lambda i: len(ids[i])), ids


class _Finished:
    """Completions kept in a JSONL file (``{"prompt", "output", "sha256"}`` per line, the last the hash of the
    other two) so that an interrupted evaluation goes on where it stopped; without a file it keeps nothing.
    Sampled draws (pass@k) are kept in the same file with their sample index and draw settings
    (``{"prompt", "output", "sample", "draw": {"n", "temperature", "seed"}, "sha256"}``, hashed together): only
    those of the same draw settings are reused. Lines are validated one by one: a line cut short, not UTF-8, not
    JSON, missing a key or not matching its hash is dropped (named on stderr, the file rewritten without it) and
    its prompt decoded again."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path).expanduser() if path is not None else None
        self.done: dict[str, str] = {}
        self.draws: dict[tuple[str, int, str], str] = {}
        if self.path is not None and self.path.is_file():
            rows = read_jsonl(self.path, check=self._check, on_bad="drop", what="finished-completion file")
            self.done = {row["prompt"]: row["output"] for row in rows if "sample" not in row}
            self.draws = {(row["prompt"], row["sample"], self._key(row["draw"])): row["output"] for row in rows
                          if "sample" in row}

    @staticmethod
    def _key(draw: Mapping[str, Any]) -> str:
        return json.dumps(draw, sort_keys=True)

    @staticmethod
    def _hash(prompt: str, output: str, *drawn: Any) -> str:
        return sha256_bytes(json.dumps([prompt, output, *drawn], ensure_ascii=False, sort_keys=True).encode())

    @classmethod
    def _check(cls, row: Any, where: str) -> None:
        if not (isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("output"), str)):
            raise DataError(f"{where}: a finished completion needs the strings 'prompt' and 'output'.")
        drawn = (row.get("sample"), row.get("draw")) if "sample" in row else ()
        if drawn and not (isinstance(drawn[0], int) and isinstance(drawn[1], dict)):
            raise DataError(f"{where}: a finished draw needs an integer 'sample' and its 'draw' settings.")
        if row.get("sha256") != cls._hash(row["prompt"], row["output"], *drawn):
            raise DataError(f"{where}: the completion does not match its sha256 (edited or damaged).")

    def draw(self, prompt: str, sample: int, draw: Mapping[str, Any]) -> str | None:
        """The finished draw ``sample`` of ``prompt`` under the draw settings ``draw``, or None."""
        return self.draws.get((prompt, sample, self._key(draw)))

    def add_draws(self, prompts: Sequence[str], samples: Sequence[int], outputs: Sequence[str],
                  draw: Mapping[str, Any]) -> None:
        if self.path is None:
            return
        append_jsonl(self.path, [{"prompt": p, "output": o, "sample": j, "draw": dict(draw),
                                  "sha256": self._hash(p, o, j, dict(draw))}
                                 for p, j, o in zip(prompts, samples, outputs)])
        fault_point("eval:after-draws")

    def add(self, prompts: Sequence[str], outputs: Sequence[str]) -> None:
        if self.path is None:
            return
        append_jsonl(self.path, [{"prompt": p, "output": o, "sha256": self._hash(p, o)}
                                 for p, o in zip(prompts, outputs)])
        fault_point("eval:after-batch")


def _read_drafts(drafts, task: str) -> dict[str, str] | None:
    """``{prompt: guessed completion}`` from a mapping or from an earlier report on ``task``."""
    if drafts is None or isinstance(drafts, Mapping):
        return drafts
    path = Path(drafts).expanduser()
    if not path.is_file():
        raise PktjaxError(f"drafts: no report at {path}; give an evaluation report (JSON) of the same task, or "
                          "no drafts.")
    report = read_json(path, "evaluation report given as drafts")  # checksum, UTF-8 and JSON verified
    if report.get("task") != task:
        raise PktjaxError(f"drafts: {path} is a report on {report.get('task')!r}, not on {task!r}; its "
                          "completions are no guesses for these prompts.")
    return {r["prompt"]: r["output"] for r in report["records"] if r.get("prompt") is not None}


def _complete(prompts, max_new, stop, model, tok, generator, batch_size, add_special_tokens, progress,
              finished: _Finished, guesses: dict[str, str] | None = None, settings: dict | None = None) -> list[str]:
    """Greedy completions of ``prompts`` (in their order), batched by similar length; those in ``finished`` are
    reused, the others recorded there batch by batch. ``guesses``: drafts by prompt (model decoding only)."""
    outputs: list[str | None] = [finished.done.get(p) for p in prompts]
    todo = [i for i, o in enumerate(outputs) if o is None]
    if len(todo) < len(prompts):
        progress(len(prompts) - len(todo))
    if generator is not None and todo:
        outs = list(generator([prompts[i] for i in todo], max_new, stop))
        for i, text in zip(todo, outs):
            outputs[i] = text
        finished.add([prompts[i] for i in todo], outs)
        progress(len(todo))
    elif todo:
        _decode(prompts, todo, outputs, max_new, stop, model, tok, batch_size, add_special_tokens, progress, finished,
                guesses, settings)
    return outputs


def _decode(prompts, todo, outputs, max_new, stop, model, tok, batch_size, add_special_tokens, progress,
            finished: _Finished, guesses: dict[str, str] | None = None, settings: dict | None = None) -> None:
    """Greedy completions of ``prompts[todo]`` into ``outputs``: ``batch_size`` decode slots, prompts admitted
    shortest first (similar lengths share a prefill), each completion recorded in ``finished`` as it ends.
    ``guesses``: drafts by prompt; how many of their tokens the model kept goes into ``settings``."""
    order, _ = _order_by_length(tok, [prompts[i] for i in todo], add_special_tokens)
    limit = _prompt_room(model, max_new)
    idx = [todo[j] for j in order]
    extra: dict[str, Any] = {}
    if guesses is not None:
        extra["drafts"] = [tok(guesses[prompts[i]], add_special_tokens=False)["input_ids"]
                           if guesses.get(prompts[i]) else None for i in idx]
        extra["stats"] = {}

    def done(rows: list[int], gen) -> None:
        for r, text in zip(rows, gen.texts):
            outputs[idx[r]] = text
        finished.add([prompts[idx[r]] for r in rows], gen.texts)
        progress(len(rows))

    generate_text(model.params, model.config, tok, [prompts[i] for i in idx], max_new, stop=stop,
                  add_special_tokens=add_special_tokens, max_prompt_tokens=limit, slots=batch_size, on_done=done,
                  **extra)
    if guesses is not None and settings is not None:
        stats = extra["stats"]
        settings["drafts_kept"] = {"prompts": sum(d is not None for d in extra["drafts"]),
                                   "tokens": stats.get("draft_tokens", 0), "kept": stats.get("draft_agreed", 0)}


def _prompt_room(model: Model, max_new: int) -> int:
    """Prompt tokens kept (the last ones) so that ``max_new`` new tokens fit in the model's context."""
    limit = model.config.max_position_embeddings - max_new
    if limit < 1:
        raise PktjaxError(f"max_new_tokens={max_new} leaves no room for a prompt in a context of "
                          f"{model.config.max_position_embeddings} tokens.")
    return limit


def _sample(prompts, n, temperature, seed, max_new, stop, model, tok, generator, batch_size, add_special_tokens,
            progress, finished: _Finished) -> list[list[str]]:
    """``n`` completions of every prompt drawn at ``temperature``: ``[len(prompts)][n]``, decoded in
    ``batch_size`` slots. Draw ``j`` of problem ``i`` samples with the key of ``seed`` and its id ``i * n + j``
    only (not its slot, nor which other draws share the call), so the draws repeat for the same settings and a
    resumed evaluation decodes only the draws ``finished`` lacks, getting those an uninterrupted run gets."""
    draw = {"n": n, "temperature": temperature, "seed": seed}
    repeated = [p for p in prompts for _ in range(n)]
    outs: list[str | None] = [finished.draw(p, k % n, draw) for k, p in enumerate(repeated)]
    todo = [k for k, o in enumerate(outs) if o is None]

    def done(rows: list[int], texts: Sequence[str]) -> None:
        for r, text in zip(rows, texts):
            outs[todo[r]] = text
        finished.add_draws([repeated[todo[r]] for r in rows], [todo[r] % n for r in rows], texts, draw)

    if generator is not None and todo:
        done(list(range(len(todo))), list(generator([repeated[k] for k in todo], max_new, stop)))
    elif todo:
        generate_text(model.params, model.config, tok, [repeated[k] for k in todo], max_new, stop=stop,
                      add_special_tokens=add_special_tokens, max_prompt_tokens=_prompt_room(model, max_new),
                      temperature=temperature, key=jax.random.key(seed), slots=batch_size, sample_ids=todo,
                      on_done=lambda rows, gen: done(rows, gen.texts))
    progress(len(prompts))
    return [outs[i * n:(i + 1) * n] for i in range(len(prompts))]


def _pass_at_k(mod, examples, prompts, n, temperature, seed, ks, model, tok, generator, batch_size,
               add_special_tokens, max_new, timeout, workers, progress, records, out,
               finished: _Finished) -> dict[str, Any]:
    """Draw ``n`` completions per problem (those in ``finished`` reused), score them, add ``n_passed`` to each
    record and return the pass@k summary (its samples file written beside ``out``)."""
    draws = _sample(prompts, n, temperature, seed, max_new, mod.STOP, model, tok, generator, batch_size,
                    add_special_tokens, progress, finished)
    flat_ex = [ex for ex in examples for _ in range(n)]
    flat = [o for outs in draws for o in outs]
    if hasattr(mod, "program"):
        results = sandbox.run_many([mod.program(ex, o) for ex, o in zip(flat_ex, flat)], workers=workers,
                                   timeout=timeout)
        ok = [r.ok for r in results]
    else:
        ok = [bool(mod.score(ex, o)["correct"]) for ex, o in zip(flat_ex, flat)]
    counts = [(n, sum(ok[i * n:(i + 1) * n])) for i in range(len(examples))]
    for rec, (_, c) in zip(records, counts):
        rec["n_passed"] = c
    summary = {"n": n, "temperature": temperature, "seed": seed, "estimator": "unbiased (Chen et al. 2021)",
               **pass_at_ks(counts, ks)}
    if has_samples(mod) and out is not None:
        summary["samples_file"] = str(write_samples(samples_path(out, n), [mod.to_sample(ex, o) for ex, o in
                                                                           zip(flat_ex, flat)]))
    return summary


@partial(jax.jit, static_argnames=("cfg",))
def _next_token_logits(params, cfg, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Logits ``[B, V]`` for the token after left-padded ``ids, mask [B, T]`` (no ``[B, T, V]`` tensor)."""
    hidden = hidden_states(params, cfg, ids, mask)
    return unembed(params, cfg, hidden[:, -1])


def _run_choice(mod, examples, few_shot, model, tok, batch_size, add_special_tokens, hub, progress,
                render) -> list[dict]:
    """MMLU-style scoring: one forward pass per batch, the letter with the highest logit wins."""
    if model is None:
        name = mod.__name__.rsplit(".", 1)[-1]
        raise PktjaxError(f"{name} is scored from logits; it needs a model, not a generator.")
    choice_ids = mod.choice_token_ids(tok)
    max_len = model.config.max_position_embeddings
    prompts, ids, shots_used = [], [], []
    for ex in examples:
        p, x, k = _fitting_prompt(mod, ex, few_shot, tok, add_special_tokens, max_len, hub, render)
        prompts.append(p)
        ids.append(x)
        shots_used.append(k)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    records: list[dict] = [{} for _ in examples]
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    for lo in range(0, len(order), batch_size):
        idx = order[lo:lo + batch_size]
        batch, mask = _left_pad([ids[i] for i in idx], pad)
        logits = np.asarray(_next_token_logits(model.params, model.config, jnp.asarray(batch), jnp.asarray(mask)))
        for row, i in enumerate(idx):
            letter, probs = mod.pick_letter(logits[row], choice_ids)
            verdict = mod.score(examples[i], letter)
            records[i] = {"id": examples[i]["id"], "prompt": prompts[i], "output": letter,
                          "verdict": "correct" if verdict["correct"] else "wrong", **verdict,
                          "probs": dict(zip(mod.LETTERS, np.round(probs, 6).tolist())), "shots": shots_used[i]}
        progress(len(idx))
    return records


def _fitting_prompt(mod, ex, few_shot, tok, add_special_tokens, max_len, hub, render) -> tuple[str, list[int], int]:
    """``(prompt, ids, shots)``: the prompt with as many of the ``few_shot`` exemplars as fit in ``max_len``
    tokens (dropping the last ones first; left-truncated when even the bare question is too long)."""
    exemplars = mod.dev_exemplars(ex["subject"], hub=hub)[:few_shot] if few_shot else []
    for k in range(len(exemplars), -1, -1):
        p = mod.prompt(ex, exemplars[:k], render)
        x = list(tok(p, add_special_tokens=add_special_tokens)["input_ids"])
        if len(x) <= max_len:
            return p, x, k
    return p, x[-max_len:], 0


def _left_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """``[B, T]`` ids and mask, padded on the left to bucketed batch and length (dummy rows copy row 0)."""
    b, t = round_batch(len(rows)), round_length(max(len(r) for r in rows))
    ids = np.full((b, t), pad, np.int32)
    mask = np.zeros((b, t), np.int32)
    for i in range(b):
        r = rows[i] if i < len(rows) else rows[0]
        ids[i, t - len(r):], mask[i, t - len(r):] = r, 1
    return ids, mask


# ------------------------------------------------------------------------------------------------ scoring

def _score_generations(mod, examples, prompts, outputs, timeout, workers, settings) -> list[dict]:
    if hasattr(mod, "program"):
        programs = [mod.program(ex, out) for ex, out in zip(examples, outputs)]
        results = sandbox.run_many(programs, workers=workers, timeout=timeout)
        settings.update(sandbox_timeout_s=timeout, sandbox=results[0].isolation if results else None)
        return [_code_record(ex, p, o, prog, r) for ex, p, o, prog, r in zip(examples, prompts, outputs, programs,
                                                                              results)]
    records = []
    for ex, p, o in zip(examples, prompts, outputs):
        verdict = mod.score(ex, o)
        records.append({"id": ex["id"], "prompt": p, "output": o,
                        "verdict": "correct" if verdict["correct"] else "wrong", **verdict})
    return records


def _code_record(ex, prompt, output, program, res: sandbox.Result) -> dict:
    if res.ok:
        verdict = "passed"
    elif res.killed:
        verdict = f"failed: {res.killed}"
    else:
        last = res.stderr.strip().splitlines()[-1:] or [f"exit code {res.returncode}"]
        verdict = f"failed: {last[0][:200]}"
    return {"id": ex["id"], "prompt": prompt, "output": output, "program": program, "verdict": verdict,
            "correct": res.ok, "returncode": res.returncode, "stderr_tail": res.stderr[-1000:],
            "duration_s": round(res.duration, 3)}


def _report(task: str, records: list[dict], settings: dict, seconds: float) -> dict[str, Any]:
    n = len(records)
    correct = sum(bool(r["correct"]) for r in records)
    lo, hi = wilson_interval(correct, n)
    return {"task": task, "score": correct / n if n else 0.0, "ci95": [lo, hi], "ci_method": "wilson",
            "n": n, "n_correct": correct, "settings": settings, "seconds": round(seconds, 2), "records": records}


def score_samples(path: str | os.PathLike, task: str, pass_k: Sequence[int] = (1, 10), timeout: float = 10.0,
                  workers: int | None = None, hub: bool = False, out: str | os.PathLike | None = None,
                  progress: Progress | None = None) -> dict[str, Any]:
    """Score a ``human-eval`` / EvalPlus samples file made elsewhere through pktjax's sandbox.

    Every line runs with its problem's tests; the report has one record per line, ``score`` = the mean pass@1
    estimate over the problems in the file, ``n`` = those problems and ``pass_at_k`` for every ``k`` of
    ``pass_k`` that each problem has samples for. The Wilson interval is given when each problem has one sample.
    """
    start = time.time()
    mod = get_task(task)
    if not has_samples(mod):
        raise PktjaxError(f"{task}: samples files are for the code tasks (humaneval, mbpp).")
    examples = mod.load(None, hub=hub)
    codes = read_samples(path, mod, examples)
    chosen = [ex for ex in examples if ex["id"] in codes]
    flat = [(ex, code) for ex in chosen for code in codes[ex["id"]]]
    results = sandbox.run_many([mod.check_program(ex, code) for ex, code in flat], workers=workers,
                               timeout=timeout)
    (progress or (lambda k: None))(len(chosen))
    records = [_code_record(ex, None, code, mod.check_program(ex, code), r) for (ex, code), r in zip(flat, results)]
    counts = [(len(codes[ex["id"]]), sum(r["correct"] for r in records if r["id"] == ex["id"])) for ex in chosen]
    settings = {"task": task, "samples": str(path), "sandbox_timeout_s": timeout,
                "sandbox": results[0].isolation if results else None}
    report = _report(task, records, settings, time.time() - start)
    single = all(n == 1 for n, _ in counts)
    report.update(n=len(chosen), n_samples=len(records), score=sum(c / n for n, c in counts) / len(counts),
                  pass_at_k=pass_at_ks(counts, pass_k))
    if not single:
        report.update(ci95=None, ci_method=None, n_correct=sum(c for _, c in counts))
    report["provenance"] = provenance(settings, [path, *([] if hub else mod.data_files(chosen, 0))])
    if out is not None:
        write_report(report, out)
    return report


def write_report(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``report`` as indented JSON (parent folders created), atomically, with its checksum recorded."""
    return write_json(Path(path).expanduser(), report, checksum=True, indent=2)
