"""The PyTorch baseline's stages on the benchmark workload."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experiments.bench.measure import Measured, Memory, log, measure
from experiments.bench.models import load_torch
from experiments.bench.sizes import Size
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


def _sync(device: str):
    def sync(out):
        if device == "cuda":
            torch.cuda.synchronize()
        return out
    return sync


@torch.no_grad()
def _products(x: torch.Tensor, w_u: torch.Tensor, blocks: int) -> torch.Tensor:
    """``blocks`` products ``[c, d] x [d, V]``, each on a rescaled copy of ``x``."""
    z = None
    for i in range(blocks):
        z = torch.matmul(x * (1.0 + i), w_u.T)
    return z


class TorchPhase:
    """Loads the pair in PyTorch and measures every stage; ``results[stage]`` is a :class:`Measured`."""

    def __init__(self, teacher_dir: Path, student_dir: Path, size: Size, work: Workload, device: str, reps: int):
        self.size, self.work, self.reps = size, work, reps
        self.device = "cuda" if device == "gpu" else "cpu"
        self.memory, self.sync = Memory("torch", device), _sync(self.device)
        self.teacher, self.student = load_torch(teacher_dir, self.device), load_torch(student_dir, self.device)
        self.results: dict[str, Measured] = {}

    def _measure(self, name: str, run, setup=lambda: None) -> Measured:
        self.results[name] = measure(run, self.sync, self.memory, self.reps, setup)
        log(f"torch  {name:20s} median {self.results[name].median:.4g} s "
            f"(first call {self.results[name].warmup_s:.3g} s)")
        return self.results[name]

    def attribution(self) -> None:
        ids = torch.as_tensor(self.work.ids, dtype=torch.long, device=self.device)
        for name, model in (("teacher", self.teacher), ("student", self.student)):
            self._measure(f"attribution_{name}",
                          lambda _, m=model: attribution(m, ids, self.work.target, chunk=self.size.chunk))

    def matmul_floor(self) -> dict[str, Measured]:
        """Time of the baseline's own ``[chunk, d] x [d, V]`` products alone (same blocks as the attribution)."""
        from experiments.bench.pktjax_phase import floor_blocks

        out = {}
        for name, model, shape in (("teacher", self.teacher, self.size.teacher),
                                   ("student", self.student, self.size.student)):
            w_u = model.get_output_embeddings().weight
            x = torch.randn(min(self.size.chunk, shape.hidden), shape.hidden, device=self.device)
            blocks = floor_blocks(shape, self.size.chunk)
            out[name] = measure(lambda _: _products(x, w_u, blocks), self.sync, self.memory, self.reps)
            log(f"torch  matmul floor {name:8s} median {out[name].median:.4g} s")
        return out

    @torch.no_grad()
    def float64_scores(self) -> dict[str, dict[str, np.ndarray]]:
        """Attribution scores (and the selection they give) of both models recomputed in float64 by the baseline:
        a reference for both sides."""
        ids = torch.as_tensor(self.work.ids, dtype=torch.long, device=self.device)
        k, (n_f, n_a) = self.size.student.layers, self.work.counts
        out = {}
        for name, model in (("teacher", self.teacher), ("student", self.student)):
            model.double()
            scores = attribution(model, ids, self.work.target, chunk=self.size.chunk)
            model.float()
            out[name] = {"scores": _numpy(scores.as_dict()), "picked": _numpy(select(scores, k, n_f, n_a).as_dict())}
        log("torch  float64 reference scores done")
        return out

    def select(self) -> None:
        k, (n_f, n_a) = self.size.student.layers, self.work.counts
        scores = [self.results[f"attribution_{n}"].output for n in ("teacher", "student")]
        self._measure("select", lambda _: [select(s, k, n_f, n_a) for s in scores])

    def extract(self, picked: Picked) -> None:
        self._measure("extract", lambda _: extract(self.teacher, picked, MODULES))

    def aligner_step(self, picked_student: Picked) -> None:
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
            loss = talign.aligner_step(aligner, opt, self.student, picked_student, knowledge, batches)
            return loss, aligner

        self._measure("aligner_step", run, setup)

    def lora_step(self) -> None:
        model = tlora.wrap(self.student, LORA_RANK, LORA_ALPHA, 0.05, LORA_TARGETS)
        batches = [_tensors(b, self.device) for b in self.work.lora_batches]

        def setup(train: bool = True):
            tlora.set_factors(model, self.work.lora)
            model.train(train)
            return tlora.make_optimizer(model, LORA_LR)

        self._measure("lora_step", lambda opt: tlora.lora_step(model, opt, batches), setup)
        opt = setup(train=False)  # dropout off: one step whose update is compared with pktjax's
        loss = tlora.lora_step(model, opt, batches)
        self.lora_exact = {"loss": float(loss), "params": _numpy(tlora.get_factors(model, LORA_TARGETS)),
                           "grads": _numpy(tlora.get_factors(model, LORA_TARGETS, grad=True))}

    def outputs(self) -> dict[str, Any]:
        """What the comparison needs, as NumPy."""
        res = self.results
        loss, aligner = res["aligner_step"].output
        return {
            "attribution_teacher": _numpy(res["attribution_teacher"].output.as_dict()),
            "attribution_student": _numpy(res["attribution_student"].output.as_dict()),
            "select": [_numpy(p.as_dict()) for p in res["select"].output],
            "extract": _numpy(res["extract"].output),
            "aligner_step": {"loss": float(loss),
                             "params": {m: {"w1": _numpy(h.w1), "w2": _numpy(h.w2)} for m, h in aligner.items()},
                             "grads": {m: {"w1": _numpy(h.w1.grad), "w2": _numpy(h.w2.grad)}
                                       for m, h in aligner.items()}},
            "lora_step": self.lora_exact,
            "float64": self.f64,
        }

    def run_all(self, float64: bool = False) -> dict[str, Any]:
        self.attribution()
        self.floor = self.matmul_floor()
        self.f64 = self.float64_scores() if float64 else None
        self.select()
        picked_t, picked_s = self.results["select"].output
        self.extract(picked_t)
        self.aligner_step(picked_s)
        self.lora_step()
        return self.outputs()

    def close(self) -> None:
        del self.teacher, self.student
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()
