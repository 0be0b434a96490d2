"""LaTen's *fuse* stage (SPEC §3.7): inject the teacher's aligned knowledge into the student once and save it.

Locate on one example of the train split (picked by ``random.Random(seed)``), extract at the chosen ``rate``
(it may differ from the training rate), apply the aligner saved after ``step``, inject, and write a Hugging Face
checkpoint folder with :func:`pktjax.save_model`, plus ``injection.json`` in it: the aligner step, rate, seed and
example used, and the size of the injected deltas (:func:`pktjax.inject.delta_sizes`).
(The main job injects in memory instead and evaluates the fused student at once: one locate and one extraction
serve every aligner step.)
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Sequence

from pktjax.align import AlignerParams, align, aligner_dims
from pktjax.checkpoint import Model, save_model
from pktjax.errors import CheckpointError, ConfigError, PairError
from pktjax.inject import delta_sizes, inject
from pktjax.runfolder import write_json
from pktjax.settings import DEFAULT_DTYPE
from pktjax.sharding import as_mesh
from pktjax.train_aligner import (Source, load_aligner, load_examples, locate_and_extract, peek_config,
                                  prepare_pair, read_run)


INJECTION = "injection.json"  # the fuse record inside the fused checkpoint folder


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out}: exists and is not an empty folder; choose a new output folder.")


def _check_aligner(aligner: AlignerParams, modules: tuple[str, ...], teacher: Source, student: Source) -> None:
    dims = (peek_config(teacher).hidden_size, peek_config(student).hidden_size)
    if aligner_dims(aligner) != dims:
        raise PairError(f"the aligner maps hidden sizes {aligner_dims(aligner)} (teacher, student) but the models "
                        f"have {dims}; use the aligner trained for this pair.")
    missing = [m for m in modules if m not in aligner]
    if missing:
        raise ConfigError(f"the aligner has no hypernetwork for {missing}; it was trained for {sorted(aligner)}.")


def fuse_example(examples: Sequence[dict[str, Any]], seed: int) -> dict[str, Any]:
    """The train-split example a fuse with ``seed`` locates on (``random.Random(seed)``)."""
    return examples[random.Random(seed).randrange(len(examples))]


def fuse(teacher: Source, student: Source, aligner_dir: str | os.PathLike, step: int,
         examples: Sequence[dict[str, Any]] | str | os.PathLike, out: str | os.PathLike, *, rate: float = 0.1,
         seed: int = 42, modules: Sequence[str] | None = None, mode: str | None = None,
         attention: str | None = None, layers: int | None = None, tokenizer=None, dtype: str | None = None,
         mesh=None, cache: str | os.PathLike | None = None) -> Path:
    """Write the fused student to ``out`` and return its path.

    ``aligner_dir``: a :func:`pktjax.train_aligner` output folder; ``step``: which saved aligner to apply.
    ``modules``, ``mode``, ``attention``, ``layers`` (K) and ``dtype`` (the weights' storage dtype, also that of the
    saved student) default to the training run's. ``mesh`` (a :class:`jax.sharding.Mesh` or a spec such as
    ``"fsdp=4,tensor=2"``): the models are loaded onto it by the sharding rules. Every check (output folder, data,
    pair, aligner sizes, mesh) runs before the models are loaded. ``cache``: a folder of attribution scores
    (:func:`pktjax.train_aligner.locate_pair`) to read the example's scores from, or keep them in.
    """
    out = Path(out)
    _check_out(out)
    run = read_run(aligner_dir)
    aligner = load_aligner(aligner_dir, step)
    examples = load_examples(examples, "train")
    modules = tuple(modules or run["modules"])
    _check_aligner(aligner, modules, teacher, student)
    layers = layers or run["config"].get("layers")
    dtype = dtype or run["config"].get("dtype", DEFAULT_DTYPE)
    pair = prepare_pair(teacher, student, rate=rate, modules=modules, tokenizer=tokenizer, layers=layers,
                        mesh=as_mesh(mesh), dtype=dtype)
    index = random.Random(seed).randrange(len(examples))  # the example fuse_example picks
    knowledge, _, sel_s = locate_and_extract(pair, examples[index], mode or run["config"]["mode"],
                                             attention or run["config"]["attention"], layers, cache)
    deltas = align(aligner, knowledge)
    record = {"aligner": str(aligner_dir), "step": step, "rate": rate, "seed": seed, "example": index,
              "modules": list(modules), "delta": delta_sizes(pair.student.params, pair.student.config, sel_s, deltas)}
    params = inject(pair.student.params, pair.student.config, sel_s, deltas)
    out = save_model(Model(params=params, config=pair.student.config, source=pair.student.source), out)
    write_json(out / INJECTION, record, checksum=True)
    return out
