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
    eval: {task: null, limit: null, max_new_tokens: null, batch_size: 8, few_shot: 0,   # task: from the top
           prompt_format: paper}       # `task`; limit: the whole test set; max_new_tokens: the task's (512);
                                       # prompt_format: paper | chat_template (the model's own)
    laten: {seeds: [42], steps: null, rate: 0.1, lr: 3e-5, cutoff_len: 768, examples_per_step: 16,
            micro_batch: 4, fuse_steps: all | last | [1, 2], layers: null}   # seeds: [] skips LaTen;
            # layers: K (default every student layer); lr: one peak rate or a list (each run for every seed);
            # the one-cycle schedule spans the whole extract split, steps (null: all) only stops it early;
            # step t = the aligner after t + 1 updates (step 0 took one update at lr/25)
    seeking: {seeds: [1], rank: 16, alpha: 16, dropout: 0.05, lr: 3e-4, epochs: 3, batch_size: 64,
              micro_batch: 8, cutoff_len: 2048, dtype: float32, targets: null, data: null, limit: null,
              samples: 32, seed_data: null, teacher_dtype: float32}
    lora:  {seeds: [1], rank: 16, ..., targets: null, data: null, limit: null}   # the seeking keys up to limit
    pissa: {...}                                                                  # same keys as lora
    semalign: {seeds: [1], ..., epochs: 5, lr: null, targets: [v_proj, o_proj, up_proj, down_proj],  # seeking's
               mode: lora | weights, compare: ffn | update | residual, frame: paper | dual, layer: null}  # keys
    analysis: {metric: cka | cosine | both, n_examples: 16, rank: 16, modules: [up_proj, down_proj, v_proj,
               o_proj], batch_size: 4, cutoff_len: 768, max_tokens: 4096, seeking: true, full_heatmap: false}
    out: runs/NAME

LoRA-trained students default to SPEC §4 (the Seeking authors' trainer: rank 16, alpha 16, dropout 0.05,
lr 3e-4, 3 epochs, batch 64, all nine target modules), trained on the task's LaTen train split (``data``: a
JSONL file or a Seeking task name instead; ``limit``: its first N examples). Seeking's seed examples are up to
``samples`` (default 32) of a Seeking task's shipped samples (gsm, mmlu, super_ni, lima), else the first
``samples`` of the train split (``seed_data`` names another source). The analysis reuses the ``seeking``
stage's extraction when ranks and modules allow.

Modules: :mod:`~pktjax.transfer.config` (the schema, its defaults and checks), :mod:`~pktjax.transfer.models`
(model specs and the pair check), :mod:`~pktjax.transfer.stages` (the stages and :func:`run_transfer`),
:mod:`~pktjax.transfer.report` (scores, report and figures).
"""

from pktjax.transfer.config import (EVAL_DEFAULTS, EVAL_TASK, LATEN_DEFAULTS, LORA_DEFAULTS, POSTPKT, SECTIONS,
                                    SEEKING_DEFAULTS, SEMALIGN_DEFAULTS, TOP_KEYS, TRAIN_KEYS, TransferConfig,
                                    lora_config, read_config, semalign_config)
from pktjax.transfer.models import check_pair, hub_model, parse_tiny, resolve_model
from pktjax.transfer.report import plot_aligner_curves, vs_student, write_report
from pktjax.transfer.stages import _timed, run_transfer

__all__ = [
    "EVAL_DEFAULTS", "EVAL_TASK", "LATEN_DEFAULTS", "LORA_DEFAULTS", "POSTPKT", "SECTIONS", "SEEKING_DEFAULTS",
    "SEMALIGN_DEFAULTS", "TOP_KEYS", "TRAIN_KEYS", "TransferConfig", "check_pair", "hub_model", "lora_config",
    "parse_tiny", "plot_aligner_curves", "read_config", "resolve_model", "run_transfer", "semalign_config",
    "vs_student", "write_report",
]
