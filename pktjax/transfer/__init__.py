"""The main job: one config in, a report folder out (``pktjax transfer CONFIG``).

Stages, each skipped when its result file already exists (so an interrupted run resumes where it stopped):

1. ``models``: resolve the teacher and student (a checkpoint folder, a ``.gguf`` file, ``registry:PAIR/ROLE``
   for a model installed by ``pktjax models install``, ``tiny:k=v,...`` for a random model built on the spot,
   or a Hugging Face repo id ``org/name[@revision]``, read from Hugging Face's cache, downloaded when online),
   check the pair before any heavy work;
2. ``eval/student.json``, ``eval/teacher.json``: the base models on the evaluation task;
3. ``laten/seed<s>/step<k>/eval.json``: the aligner run of each seed, then every chosen aligner step fused and
   evaluated, with ``injection.json`` beside it (the size of the injected deltas; LaTen, Pre-Align PKT); with
   several learning rates, ``laten/lr<lr>/seed<s>/...`` for each;
4. optional, when the config has the section: ``seeking/seed<s>/eval.json`` (Seeking, Post-Align PKT: teacher
   sensitivity, layer and sub-matrix selection, SVD into a LoRA of the student's shape, extracted once into
   ``seeking/extracted/``, then LoRA training from that init, merge, evaluate), ``lora/seed<s>/eval.json``
   (standard LoRA init) and ``pissa/seed<s>/eval.json`` (PiSSA init), each with its PEFT adapter beside it;
   ``semalign/seed<s>/eval.json`` (SemAlign: teacher layer attribution and pairing once into
   ``semalign/plan.json``, then the paired student layer trained on recomposed teacher outputs, evaluated;
   with an ``analysis`` section also its before / after CKA view);
5. optional: ``analysis/analysis.json``: the neural-incompatibility analysis of the pair (figures + numbers);
6. ``report.md`` + ``scores.json`` + ``aligner_curves.png`` + ``delta_vs_score.png``: the table of scores with
   confidence intervals (LaTen rows with the relative size of their injected deltas), the spread over seeds, each
   trained model against the base student (:func:`vs_student`), the analysis figures, the timings.

Config (YAML or JSON; an unknown key anywhere is an error naming the allowed ones)::

    teacher: PATH | registry:qwen2.5-coder/teacher | tiny:hidden=64,layers=4,inter=96,heads=4,seed=1 | org/name
    student: PATH | registry:qwen2.5-coder/student | tiny:... | org/name
    task: gsm | mmlu | humaneval | mbpp        # LaTen splits (../shared/data/laten/<task>/)
    eval: {task, limit, max_new_tokens, batch_size, few_shot, prompt_format}
    laten: {seeds, steps, rate, lr, cutoff_len, examples_per_step, micro_batch, fuse_steps, layers, locate_batch}
    seeking: {seeds, rank, alpha, dropout, lr, epochs, batch_size, micro_batch, cutoff_len, dtype, targets, data,
              limit, samples, seed_data, teacher_dtype}
    lora:  {seeds, rank, ..., targets, data, limit}   # the seeking keys up to limit
    pissa: {...}                                      # same keys as lora
    semalign: {seeds, ..., teacher_dtype, mode, compare, frame, layer}   # the seeking keys and SemAlign's own
    analysis: {metric, n_examples, rank, modules, batch_size, cutoff_len, max_tokens, seeking, full_heatmap}
    out: runs/NAME
    mesh: null | fsdp=4,tensor=2 | data=2,fsdp=2,tensor=2    # null: one device; `pktjax transfer --mesh` sets it
    dtype: float32 | bfloat16          # the weights' storage dtype (a section's null dtype / teacher_dtype: this)
    device_memory_gb: null             # what the fit check assumes (null: what the device reports; CPU: no check)

Each section's keys, defaults, allowed values and meaning are those of its class in :mod:`pktjax.settings`
(:data:`~pktjax.transfer.config.SECTIONS`); ``pktjax transfer CONFIG --print-config`` prints a config with every
default filled in, and ``pktjax transfer CONFIG key=value ...`` overrides settings (``laten.lr=3e-4``).
``laten.seeds: []`` skips LaTen; ``laten.lr`` is one peak rate or a list (each run for every seed); the
one-cycle schedule spans the whole extract split, ``laten.steps`` (null: all) only stops it early, and step ``t``
is the aligner after ``t + 1`` updates; settings that cannot change results (``eval.batch_size``,
``laten.micro_batch``, ``result=False`` in :mod:`pktjax.settings`) are left out of the run's fingerprint, so changing
them does not block resuming.

LoRA-trained students default to SPEC §4 (the Seeking authors' trainer, all nine target modules), trained on the
task's LaTen train split (``data``: a JSONL file or a Seeking task name instead; ``limit``: its first N examples).
Seeking's seed examples are up to ``samples`` of a Seeking task's shipped samples (gsm, mmlu, super_ni, lima), else
the first ``samples`` of the train split (``seed_data`` names another source). The analysis reuses the ``seeking``
stage's extraction when ranks and modules allow.

The top-level ``mesh``, ``dtype`` and ``device_memory_gb`` are :class:`pktjax.settings.DeviceSettings`. With
``mesh``, every stage loads its models onto the mesh by the sharding rules (locate, the aligner, LoRA and SemAlign
trainings, fuse, evaluation with sharded decoding, the analysis); a run resumes on any mesh (the fingerprint
leaves the mesh out). Before anything is written or loaded, a LaTen job that ``pktjax plan`` says does not fit
the device memory is refused with the plan's numbers and the micro-batch, mesh or dtype that would fit.

Modules: :mod:`~pktjax.transfer.config` (the schema, its defaults and checks), :mod:`~pktjax.transfer.models`
(model specs and the pair check), :mod:`~pktjax.transfer.stages` (the stages and :func:`run_transfer`),
:mod:`~pktjax.transfer.report` (scores, report and figures).
"""

from pktjax.transfer.config import (EVAL_DEFAULTS, EVAL_TASK, LATEN_DEFAULTS, LORA_DEFAULTS, POSTPKT, SECTIONS,
                                    SEEKING_DEFAULTS, SEMALIGN_DEFAULTS, TOP_KEYS, TRAIN_KEYS, TransferConfig,
                                    laten_rates, lora_config, read_config, semalign_config)
from pktjax.transfer.models import check_job_pair, hub_model, parse_tiny, peek_config, resolve_model
from pktjax.transfer.report import plot_aligner_curves, vs_student, write_report
from pktjax.transfer.stages import _timed, run_transfer

__all__ = [
    "EVAL_DEFAULTS", "EVAL_TASK", "LATEN_DEFAULTS", "LORA_DEFAULTS", "POSTPKT", "SECTIONS", "SEEKING_DEFAULTS",
    "SEMALIGN_DEFAULTS", "TOP_KEYS", "TRAIN_KEYS", "TransferConfig", "check_job_pair", "hub_model", "laten_rates",
    "lora_config", "parse_tiny", "peek_config", "plot_aligner_curves", "read_config", "resolve_model", "run_transfer",
    "semalign_config", "vs_student", "write_report",
]
