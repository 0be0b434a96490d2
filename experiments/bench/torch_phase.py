"""The PyTorch baseline's stages on the benchmark workload, as jobs for :mod:`experiments.bench.measure`."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experiments.bench.measure import Job, Measured, Memory
from experiments.bench.models import load_torch
from experiments.bench.sizes import Size, floor_blocks
from experiments.bench.workload import ALIGNER_LR, LORA_ALPHA, LORA_LR, LORA_RANK, LORA_TARGETS, MODULES, Workload
from experiments.torch_baseline import align as talign
from experiments.torch_baseline import lora as tlora
from experiments.torch_baseline.locate import attribution
from experiments.torch_baseline.selection import Picked, extract, select


def _numpy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _numpy(v) for k, v in tree.items()}
    return tree.detach().cpu().numpy() if isinstance(tree, torch.Tensor) else tree


def _tensors(batch: dict[str, np.ndarray], device: str) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v, dtype=torch.float32 if k == "weight" else torch.long, device=device)
            for k, v in batch.items()}


@torch.no_grad()
def _products(x: torch.Tensor, w_u: torch.Tensor, blocks: int) -> torch.Tensor:
    """``blocks`` products ``[c, d] x [d, V]``, each on a rescaled copy of ``x``."""
    z = None
    for i in range(blocks):
        z = torch.matmul(x * (1.0 + i), w_u.T)
    return z


class TorchPhase:
    """The pair loaded in PyTorch; :meth:`job` gives each stage, ``results[stage]`` holds its measurement.
    ``picked`` (teacher, student selections) feeds extract and the aligner step once select has run."""

    def __init__(self, teacher_dir: Path, student_dir: Path, size: Size, work: Workload, device: str):
        self.size, self.work = size, work
        self.device = "cuda" if device == "gpu" else "cpu"
        self.memory = Memory("torch", device)
        self.teacher, self.student = load_torch(teacher_dir, self.device), load_torch(student_dir, self.device)
        self.models = {"teacher": (self.teacher, size.teacher), "student": (self.student, size.student)}
        self.results: dict[str, Measured] = {}
        self.picked: tuple[Picked, Picked] | None = None
        self.peft_model = None

    def sync(self, out: Any) -> Any:
        if self.device == "cuda":
            torch.cuda.synchronize()
        return out

    def job(self, stage: str) -> Job:
        kind, _, model = stage.partition("_")
        if kind in ("attribution", "floor"):
            return getattr(self, f"_{kind}")(model)
        return getattr(self, f"_{stage}")()

    def _attribution(self, name: str) -> Job:
        ids = torch.as_tensor(self.work.ids, dtype=torch.long, device=self.device)
        model = self.models[name][0]
        return Job(lambda _: attribution(model, ids, self.work.target, chunk=self.size.chunk), self.sync,
                   self.memory)

    def _floor(self, name: str) -> Job:
        """The baseline's own ``[chunk, d] x [d, V]`` products alone, as many as the attribution needs."""
        model, shape = self.models[name]
        w_u = model.get_output_embeddings().weight
        x = torch.randn(self.size.chunk, shape.hidden, device=self.device)
        blocks = floor_blocks(shape, self.size.chunk)
        return Job(lambda _: _products(x, w_u, blocks), self.sync, self.memory)

    def _select(self) -> Job:
        k, (n_f, n_a) = self.size.student.layers, self.work.counts
        scores = [self.results[f"attribution_{n}"].output for n in ("teacher", "student")]
        return Job(lambda _: [select(s, k, n_f, n_a) for s in scores], self.sync, self.memory)

    def _extract(self) -> Job:
        return Job(lambda _: extract(self.teacher, self.picked[0], MODULES), self.sync, self.memory)

    def _aligner_step(self) -> Job:
        return self._aligner_job("products")

    def _aligner_step_weights(self) -> Job:
        return self._aligner_job("weights")

    def _aligner_job(self, injection: str) -> Job:
        knowledge = self.results["extract"].output
        batches = [_tensors(b, self.device) for b in self.work.aligner_batches]

        def setup():
            aligner = talign.make_aligner(MODULES, self.size.teacher.hidden, self.size.student.hidden)
            with torch.no_grad():
                for m, p in self.work.aligner.items():
                    aligner[m].w1.copy_(torch.as_tensor(np.array(p["w1"])))
                    aligner[m].w2.copy_(torch.as_tensor(np.array(p["w2"])))
            aligner.to(self.device)
            return aligner, talign.make_optimizer(aligner, ALIGNER_LR)

        def run(state):
            aligner, opt = state
            loss = talign.aligner_step(aligner, opt, self.student, self.picked[1], knowledge, batches,
                                       injection=injection)
            return loss, aligner

        return Job(run, self.sync, self.memory, setup)

    def _lora_setup(self, train: bool = True) -> torch.optim.Optimizer:
        tlora.set_factors(self.peft_model, self.work.lora)
        self.peft_model.train(train)
        return tlora.make_optimizer(self.peft_model, LORA_LR)

    def _lora_step(self) -> Job:
        """LoRA (dropout 0.05) on the student, wrapped in place: this stage comes last."""
        self.peft_model = tlora.wrap(self.student, LORA_RANK, LORA_ALPHA, 0.05, LORA_TARGETS)
        batches = [_tensors(b, self.device) for b in self.work.lora_batches]
        self.lora_batches = batches
        return Job(lambda opt: tlora.lora_step(self.peft_model, opt, batches), self.sync, self.memory,
                   self._lora_setup)

    def lora_exact(self) -> dict[str, Any]:
        """One LoRA step with dropout off (eval mode), for the comparison with pktjax."""
        loss = tlora.lora_step(self.peft_model, self._lora_setup(train=False), self.lora_batches)
        return {"loss": float(loss), "params": _numpy(tlora.get_factors(self.peft_model, LORA_TARGETS)),
                "grads": _numpy(tlora.get_factors(self.peft_model, LORA_TARGETS, grad=True))}

    @torch.no_grad()
    def float64_scores(self) -> dict[str, dict[str, np.ndarray]]:
        """Attribution scores (and the selection they give) of both models recomputed in float64 by the baseline:
        a reference for both sides. Must run before the LoRA stage wraps the student."""
        ids = torch.as_tensor(self.work.ids, dtype=torch.long, device=self.device)
        k, (n_f, n_a) = self.size.student.layers, self.work.counts
        out = {}
        for name, (model, _) in self.models.items():
            model.double()
            scores = attribution(model, ids, self.work.target, chunk=self.size.chunk)
            model.float()
            out[name] = {"scores": _numpy(scores.as_dict()), "picked": _numpy(select(scores, k, n_f, n_a).as_dict())}
        return out

    def outputs(self) -> dict[str, Any]:
        """The stage outputs the comparison needs, as NumPy (the LoRA entry comes from :meth:`lora_exact`)."""
        res = self.results
        return {
            "attribution_teacher": _numpy(res["attribution_teacher"].output.as_dict()),
            "attribution_student": _numpy(res["attribution_student"].output.as_dict()),
            "select": [_numpy(p.as_dict()) for p in res["select"].output],
            "extract": _numpy(res["extract"].output),
            **{stage: _aligner_outputs(*res[stage].output) for stage in ("aligner_step", "aligner_step_weights")},
        }

    def close(self) -> None:
        del self.teacher, self.student, self.models, self.peft_model
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()


def _aligner_outputs(loss: torch.Tensor, aligner: torch.nn.ModuleDict) -> dict[str, Any]:
    return {"loss": float(loss), "params": {m: {"w1": _numpy(h.w1), "w2": _numpy(h.w2)} for m, h in aligner.items()},
            "grads": {m: {"w1": _numpy(h.w1.grad), "w2": _numpy(h.w2.grad)} for m, h in aligner.items()}}
