"""One LoRA training step with ``peft`` (SPEC §4's trainer): response-token mean cross-entropy over a batch made of
micro-batches (gradient accumulation), clipping at global norm 1, AdamW (0.9, 0.999), eps 1e-8, no weight decay."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from experiments.torch_baseline.locate import positions

IGNORE = -100
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def wrap(model: torch.nn.Module, rank: int = 16, alpha: float = 16.0, dropout: float = 0.05,
         targets: Sequence[str] = TARGETS) -> torch.nn.Module:
    """``model`` with LoRA adapters (PEFT's standard init) on ``targets``; only the adapters train. ``model`` is
    modified in place."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none")
    return get_peft_model(model, config)


def adapter_parameters(peft_model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in peft_model.named_parameters() if p.requires_grad}


def make_optimizer(peft_model: torch.nn.Module, lr: float = 3e-4) -> torch.optim.Optimizer:
    params = list(adapter_parameters(peft_model).values())
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def summed_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies over labels that are not ``IGNORE``."""
    return F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=IGNORE,
                           reduction="sum")


def lora_step(peft_model: torch.nn.Module, optimizer: torch.optim.Optimizer,
              batches: Sequence[dict[str, torch.Tensor]], max_grad_norm: float = 1.0) -> torch.Tensor:
    """One optimizer step on the token-mean loss of all ``batches``; returns that loss (detached)."""
    optimizer.zero_grad(set_to_none=True)
    tokens = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
    total = None
    for b in batches:
        logits = peft_model(input_ids=b["ids"], attention_mask=b["mask"], position_ids=positions(b["mask"]),
                            use_cache=False).logits
        loss = summed_ce(logits, b["labels"]) / max(tokens, 1)
        loss.backward()
        total = loss.detach() if total is None else total + loss.detach()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    return total


def _adapted(peft_model: torch.nn.Module, layer: int, target: str) -> torch.nn.Module:
    block = peft_model.get_base_model().model.layers[layer]
    owner = block.mlp if target in ("gate_proj", "up_proj", "down_proj") else block.self_attn
    return getattr(owner, target)


@torch.no_grad()
def set_factors(peft_model: torch.nn.Module, factors: dict[str, dict[str, torch.Tensor]], grad: bool = False) -> None:
    """Copy stacked factors ``{target: {"a": [L, r, in], "b": [L, out, r]}}`` into the adapters (into their
    ``.grad`` with ``grad=True``)."""
    for target, ab in factors.items():
        for layer in range(ab["a"].shape[0]):
            module = _adapted(peft_model, layer, target)
            for key, factor in (("a", module.lora_A["default"]), ("b", module.lora_B["default"])):
                value = torch.as_tensor(np.array(ab[key][layer]), device=factor.weight.device)
                if grad:
                    factor.weight.grad = value.clone()
                else:
                    factor.weight.copy_(value)


def get_factors(peft_model: torch.nn.Module, targets: Sequence[str], grad: bool = False) -> dict:
    """The adapters (or their gradients) as stacked ``{target: {"a": [L, r, in], "b": [L, out, r]}}``."""
    n_layers = len(peft_model.get_base_model().model.layers)
    out = {}
    for target in targets:
        mods = [_adapted(peft_model, layer, target) for layer in range(n_layers)]
        pick = (lambda p: p.grad) if grad else (lambda p: p)
        out[target] = {"a": torch.stack([pick(m.lora_A["default"].weight).detach() for m in mods]),
                       "b": torch.stack([pick(m.lora_B["default"].weight).detach() for m in mods])}
    return out
