"""Selection (SPEC §3.2) and extraction (SPEC §3.3) on PyTorch tensors.

``torch.topk`` does not promise an order among equal values, so the top entries come from a stable descending
sort: among equal scores the lower index comes first, as the specification asks.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from experiments.torch_baseline.locate import Scores

MODULES = ("up_proj", "down_proj", "v_proj", "o_proj")
ROW_MODULES = ("up_proj", "v_proj")
FFN_MODULES = ("up_proj", "down_proj")


@dataclass
class Picked:
    """Selected ``attn_layers, ffn_layers [K]`` (ascending) and ``ffn_neurons [K, N_f]``,
    ``attn_neurons [K, N_a]`` (best first)."""

    attn_layers: torch.Tensor
    ffn_layers: torch.Tensor
    ffn_neurons: torch.Tensor
    attn_neurons: torch.Tensor

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest entries along the last axis, best first, ties to the lower index."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


def select(scores: Scores, n_layers: int, ffn_count: int, attn_count: int) -> Picked:
    """Top layers (attention and FFN separately, then ascending) and top neurons inside each of them."""
    attn_layers = torch.sort(top_indices(scores.layer_attn, n_layers)).values
    ffn_layers = torch.sort(top_indices(scores.layer_ffn, n_layers)).values
    return Picked(attn_layers=attn_layers, ffn_layers=ffn_layers,
                  ffn_neurons=top_indices(scores.ffn[ffn_layers], ffn_count),
                  attn_neurons=top_indices(scores.attn[attn_layers], attn_count))


def module_of(model: torch.nn.Module, layer: int, module: str) -> torch.nn.Linear:
    """The ``module`` projection (``up_proj``, ``o_proj``, ...) of decoder layer ``layer``."""
    block = model.model.layers[layer]
    return getattr(block.mlp if module in FFN_MODULES else block.self_attn, module)


def module_weight(model: torch.nn.Module, layer: int, module: str) -> torch.Tensor:
    """The ``[out, in]`` weight of ``module`` in decoder layer ``layer``."""
    return module_of(model, layer, module).weight


def module_index(picked: Picked, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(layers [K], neurons [K, N])`` that ``module`` reads."""
    if module in FFN_MODULES:
        return picked.ffn_layers, picked.ffn_neurons
    return picked.attn_layers, picked.attn_neurons


def weight_name(layer: int, module: str) -> str:
    """Parameter name of ``module``'s weight in layer ``layer`` of a ``*ForCausalLM`` model."""
    owner = "mlp" if module in FFN_MODULES else "self_attn"
    return f"model.layers.{layer}.{owner}.{module}.weight"


@torch.no_grad()
def extract(model: torch.nn.Module, picked: Picked, modules: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Teacher knowledge: rows ``[K, N, d]`` for up/v, columns ``[K, d, N]`` for down/o."""
    out = {}
    for m in modules:
        layers, neurons = module_index(picked, m)
        dim = 0 if m in ROW_MODULES else 1
        parts = [module_weight(model, int(l), m).index_select(dim, n) for l, n in zip(layers.tolist(), neurons)]
        out[m] = torch.stack(parts)
    return out
