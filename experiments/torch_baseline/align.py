"""The aligner of SPEC §3.4–§3.6 in PyTorch: hypernetworks, injection, one step.

``g(x) = W2 relu(W1 x)`` per module (``W1 [d_T, d_T]``, ``W2 [d_S, d_T]``, no biases). The student stays frozen
and the gradient reaches only the aligner. Two ways to inject, the same loss up to rounding: ``"products"``
(forward hooks add ``x delta^T`` to the selected outputs of up/v, or ``x[..., cols] delta^T`` to the outputs of
down/o, as pktjax's training does; no gradient for the full weights) and ``"weights"`` (the injected weights are
built out of place with ``index_add`` and passed to ``torch.func.functional_call``, as the authors' code rewrites
the weights; autograd then forms the full weight gradients of the selected layers). The loss of ``P`` examples is
``sum_p [CE_p + lambda * sum_m mean(g_m(K_m)^2)]``, accumulated over micro-batches, then one AdamW step.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.func import functional_call

from experiments.torch_baseline.locate import positions
from experiments.torch_baseline.selection import (ROW_MODULES, Picked, module_index, module_of, module_weight,
                                                  weight_name)

IGNORE = -100
INIT_STD = 1e-5
BETAS = (0.9, 0.95)
WEIGHT_DECAY = 0.05
MSE_WEIGHT = 1000.0


class Hypernet(torch.nn.Module):
    """``x [..., d_T] -> W2 relu(W1 x) [..., d_S]``."""

    def __init__(self, d_teacher: int, d_student: int, std: float = INIT_STD):
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(d_teacher, d_teacher) * std)
        self.w2 = torch.nn.Parameter(torch.randn(d_student, d_teacher) * std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.relu(F.linear(x.float(), self.w1)), self.w2)


def make_aligner(modules: Sequence[str], d_teacher: int, d_student: int) -> torch.nn.ModuleDict:
    return torch.nn.ModuleDict({m: Hypernet(d_teacher, d_student) for m in modules})


def make_optimizer(aligner: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW (0.9, 0.95), weight decay 0.05, eps 1e-8."""
    return torch.optim.AdamW(aligner.parameters(), lr=lr, betas=BETAS, eps=1e-8, weight_decay=WEIGHT_DECAY)


def align(aligner: torch.nn.ModuleDict, knowledge: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Deltas shaped like the knowledge with ``d_T`` replaced by ``d_S`` (rows for up/v, columns for down/o)."""
    out = {}
    for m, k in knowledge.items():
        if m in ROW_MODULES:
            out[m] = aligner[m](k)
        else:
            out[m] = aligner[m](k.transpose(-1, -2)).transpose(-1, -2)
    return out


def injected_weights(student: torch.nn.Module, picked: Picked, deltas: dict[str, torch.Tensor]) -> dict:
    """``{parameter name: W + delta at the selected rows/columns}`` for every touched weight (out of place)."""
    weights = {}
    for m, delta in deltas.items():
        layers, neurons = module_index(picked, m)
        dim = 0 if m in ROW_MODULES else 1
        for i, layer in enumerate(layers.tolist()):
            w = module_weight(student, layer, m)
            weights[weight_name(layer, m)] = w.index_add(dim, neurons[i], delta[i].to(w.dtype))
    return weights


def _add_rows(neurons: torch.Tensor, delta: torch.Tensor, module, args, out: torch.Tensor) -> torch.Tensor:
    return out.index_add(-1, neurons, F.linear(args[0], delta.to(out.dtype)))  # delta [N, in]


def _add_columns(neurons: torch.Tensor, delta: torch.Tensor, module, args, out: torch.Tensor) -> torch.Tensor:
    return out + F.linear(args[0].index_select(-1, neurons), delta.to(out.dtype))  # delta [out, N]


@contextmanager
def deltas_in_products(student: torch.nn.Module, picked: Picked, deltas: dict[str, torch.Tensor]) -> Iterator[None]:
    """While open, the selected modules' outputs carry the deltas (forward hooks; the weights are untouched)."""
    handles = []
    for m, delta in deltas.items():
        layers, neurons = module_index(picked, m)
        add = _add_rows if m in ROW_MODULES else _add_columns
        for i, layer in enumerate(layers.tolist()):
            handles.append(module_of(student, layer, m).register_forward_hook(partial(add, neurons[i], delta[i])))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def mean_token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example mean next-token cross-entropy ``[B]`` over labels that are not ``IGNORE``."""
    targets = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
    return nll.sum(1) / (targets != IGNORE).sum(1).clamp(min=1)


def student_logits(student: torch.nn.Module, picked: Picked, deltas: dict[str, torch.Tensor],
                   batch: dict[str, torch.Tensor], injection: str = "products") -> torch.Tensor:
    """The injected student's logits ``[B, T, V]`` (``injection``: ``"products"`` or ``"weights"``)."""
    kwargs = dict(input_ids=batch["ids"], attention_mask=batch["mask"], position_ids=positions(batch["mask"]),
                  use_cache=False)
    if injection == "weights":
        return functional_call(student, injected_weights(student, picked, deltas), args=(), kwargs=kwargs).logits
    if injection != "products":
        raise ValueError(f"injection {injection!r}: choose products or weights")
    with deltas_in_products(student, picked, deltas):
        return student(**kwargs).logits


def aligner_loss(aligner: torch.nn.ModuleDict, student: torch.nn.Module, picked: Picked,
                 knowledge: dict[str, torch.Tensor], batch: dict[str, torch.Tensor],
                 mse_weight: float = MSE_WEIGHT, injection: str = "products") -> torch.Tensor:
    """``sum_b weight_b (CE_b + mse_weight * sum_m mean(delta_m^2))`` over one micro-batch."""
    deltas = align(aligner, knowledge)
    ce = mean_token_ce(student_logits(student, picked, deltas, batch, injection), batch["labels"])
    mse = sum(d.square().mean() for d in deltas.values())
    return (batch["weight"] * (ce + mse_weight * mse)).sum()


def aligner_step(aligner: torch.nn.ModuleDict, optimizer: torch.optim.Optimizer, student: torch.nn.Module,
                 picked: Picked, knowledge: dict[str, torch.Tensor], batches: Sequence[dict[str, torch.Tensor]],
                 mse_weight: float = MSE_WEIGHT, injection: str = "products") -> torch.Tensor:
    """Gradient of the summed loss over ``batches`` (micro-batches of the ``P`` examples), then one AdamW step.
    The student must not require gradients. Returns the loss (detached)."""
    optimizer.zero_grad(set_to_none=True)
    total = None
    for batch in batches:
        loss = aligner_loss(aligner, student, picked, knowledge, batch, mse_weight, injection)
        loss.backward()
        total = loss.detach() if total is None else total + loss.detach()
    optimizer.step()
    return total
