"""The one teacher/student pair check, from the two models' configs (no weights are read).

:func:`check_pair` runs the rules of every method a job uses: a shared vocabulary always; LaTen's (a teacher
larger than the student, ``K`` layers that both models have, the modules and the neuron counts of ``rate``) when
``laten`` is given; Seeking's (one model family, a teacher at least as large in every target matrix) when
``seeking_targets`` is given. The trainers and the transfer job call it before loading anything.
"""

from __future__ import annotations

from typing import Sequence

from pktjax.config import ModelConfig
from pktjax.errors import ConfigError, PairError
from pktjax.extract import check_modules, check_pair as check_sizes
from pktjax.seeking import check_seeking_pair
from pktjax.select import neuron_counts


def layer_count(teacher: ModelConfig, student: ModelConfig, layers: int | None) -> int:
    """``K``: ``layers``, or every student layer when ``None``; at most the smaller model's depth."""
    limit = min(teacher.num_layers, student.num_layers)
    k = student.num_layers if layers is None else layers
    if not 1 <= k <= limit:
        raise ConfigError(f"layers={layers}: K must be between 1 and {limit} (the student has "
                          f"{student.num_layers} layers, the teacher {teacher.num_layers}).")
    return k


def check_laten_pair(teacher: ModelConfig, student: ModelConfig, *, rate: float,
                     modules: Sequence[str] | None = None, layers: int | None = None
                     ) -> tuple[tuple[str, ...], tuple[int, int]]:
    """LaTen's rules; returns ``(modules, (N_f, N_a))``. Errors: :class:`PairError` (vocabulary, teacher not
    larger), :class:`ConfigError` (``layers`` beyond either model's depth, ``v_proj`` with GQA, unknown module,
    ``rate`` asking for more attention neurons than the models have)."""
    check_sizes(teacher, student)
    layer_count(teacher, student, layers)
    modules = check_modules(modules, teacher, student)
    n_f, n_a = neuron_counts(student.intermediate_size, student.hidden_size, rate)
    if n_a > min(teacher.q_dim, student.q_dim):
        raise ConfigError(f"rate {rate} asks for {n_a} attention neurons per layer, more than the models have.")
    return modules, (n_f, n_a)


def check_tokenizers(teacher_tok, student_tok) -> None:
    """Both models must tokenize alike: same vocabulary and EOS."""
    if teacher_tok.get_vocab() != student_tok.get_vocab() or teacher_tok.eos_token_id != student_tok.eos_token_id:
        raise PairError("teacher and student tokenizers differ; LaTen needs one shared vocabulary.")


def check_pair(teacher: ModelConfig, student: ModelConfig, *, laten: dict | None = None,
               seeking_targets: Sequence[str] | None = None) -> None:
    """Every rule the job's methods need: ``laten``: the keyword arguments of :func:`check_laten_pair` (``rate``,
    ``modules``, ``layers``), or ``None`` without LaTen; ``seeking_targets``: Seeking's LoRA targets, or ``None``
    without Seeking."""
    if teacher.vocab_size != student.vocab_size:
        raise PairError(f"teacher vocabulary ({teacher.vocab_size}) differs from the student's "
                        f"({student.vocab_size}); both models must share one tokenizer.")
    if laten is not None:
        check_laten_pair(teacher, student, **laten)
    if seeking_targets is not None:
        check_seeking_pair(teacher, student, seeking_targets)
