"""Static log-probability attribution (SPEC §3.1) on a ``transformers`` PyTorch decoder.

One forward pass with hooks records, at the last position of every layer, the layer input ``h``, the attention
output ``a`` (after o_proj), the FFN output, the FFN coefficients ``m = act(gate) * up`` (the input of
down_proj), the value vectors and the attention probabilities (eager attention), and the last layer's output.
Every score is the gain in the target's log-probability under the vocabulary projection ``phi`` when a vector
is added to a residual, computed from the change of logits (see :meth:`Projection.gain`). Neuron scores are
batched ``[chunk, d] x [d, V]`` products over blocks of neurons under ``torch.no_grad()``; there is no Python
loop over single neurons.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields
from typing import Callable, Iterator

import torch

MODES = ("reference", "rmsnorm")
ATTENTION = ("last_key", "all_keys")
DEFAULT_CHUNK = 512



@dataclass
class Scores:
    """Attribution of one model: ``layer_attn [L]``, ``layer_ffn [L]``, ``ffn [L, f]``, ``attn [L, H*hd]``."""

    layer_attn: torch.Tensor
    layer_ffn: torch.Tensor
    ffn: torch.Tensor
    attn: torch.Tensor

    def __add__(self, other: "Scores") -> "Scores":
        return Scores(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class LastPosition:
    """What the hooks record at the last position: ``h, a, ffn_out [L, d]``, ``coeff [L, f]``,
    ``head_last_key, head_all_keys [L, H*hd]`` and the last layer's output ``output [d]``."""

    h: torch.Tensor
    a: torch.Tensor
    ffn_out: torch.Tensor
    coeff: torch.Tensor
    head_last_key: torch.Tensor
    head_all_keys: torch.Tensor
    output: torch.Tensor

    @property
    def r(self) -> torch.Tensor:
        return self.h + self.a


def _last(x: torch.Tensor) -> torch.Tensor:
    """``[1, T, ...] -> [...]`` at the last position, detached and in float32."""
    return x[0, -1].detach().float()


class _Recorder:
    """Forward hooks on every decoder layer; each hook keeps only the last position of its tensor."""

    def __init__(self, model: torch.nn.Module):
        self.decoder = model.model
        self.cfg = model.config
        self.store: dict[str, list[torch.Tensor]] = {k: [] for k in ("h", "a", "f", "m", "v", "p", "ctx")}
        self.output: torch.Tensor | None = None
        self.handles: list = []

    def _register(self, module: torch.nn.Module, key: str, pick: Callable, pre: bool = False) -> None:
        """Append ``pick(inputs, output)`` to ``store[key]`` on every call of ``module`` (before it runs when
        ``pre``, with ``output=None``)."""
        store = self.store[key]
        if pre:
            handle = module.register_forward_pre_hook(lambda mod, args: store.append(pick(args, None)))
        else:
            handle = module.register_forward_hook(lambda mod, args, out: store.append(pick(args, out)))
        self.handles.append(handle)

    def __enter__(self) -> "_Recorder":
        for layer in self.decoder.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self._register(layer, "h", lambda args, out: _last(args[0]), pre=True)
            self._register(attn, "a", lambda args, out: _last(out[0]))
            self._register(attn, "p", lambda args, out: out[1][0, :, -1].detach().float())  # [H, S]
            self._register(attn.v_proj, "v", lambda args, out: _last(out))
            self._register(attn.o_proj, "ctx", lambda args, out: _last(args[0]), pre=True)
            self._register(mlp.down_proj, "m", lambda args, out: _last(args[0]), pre=True)
            self._register(mlp, "f", lambda args, out: _last(out))
        self.handles.append(self.decoder.norm.register_forward_pre_hook(self._record_output))
        return self

    def _record_output(self, module, args) -> None:
        self.output = _last(args[0])

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

    def result(self) -> LastPosition:
        cfg = self.cfg
        heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        alpha = torch.stack(self.store["p"])[:, :, -1]  # [L, H]: weight of the last query on the last key
        values = torch.stack(self.store["v"]).unflatten(-1, (kv, hd))  # [L, KV, hd]
        values = values.repeat_interleave(heads // kv, dim=1)  # head k reads kv-head k // group
        last_key = alpha[..., None] * values  # [L, H, hd]
        stack = lambda k: torch.stack(self.store[k])  # noqa: E731
        return LastPosition(h=stack("h"), a=stack("a"), ffn_out=stack("f"), coeff=stack("m"),
                            head_last_key=last_key.flatten(1), head_all_keys=stack("ctx"), output=self.output)


@contextlib.contextmanager
def eager_attention(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model`` with eager attention (so the attention modules return their probabilities)."""
    before = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    try:
        yield
    finally:
        model.config._attn_implementation = before


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Left-padding aware positions ``cumsum(mask) - 1`` (pads at 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def capture(model: torch.nn.Module, input_ids: torch.Tensor,
            attention_mask: torch.Tensor | None = None) -> LastPosition:
    """One forward of the decoder body (no vocabulary head) over ``input_ids [1, T]``, recording the last position."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    with eager_attention(model), _Recorder(model) as rec:
        model.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask),
                    use_cache=False)
    return rec.result()


def unembedding(model: torch.nn.Module) -> torch.Tensor:
    """``W_U [V, d]`` (the lm_head weight, which is the embedding when the two are tied)."""
    return model.get_output_embeddings().weight


class Projection:
    """The vocabulary projection ``phi`` of SPEC §3.1 and the target's log-probability gains under it.

    ``reference``: ``gamma * x * (sigma + 1e-6)^(-1/2)`` with ``sigma = sqrt(Var(output) + 1e-5)``, one scalar
    from the last layer's output; ``rmsnorm``: the model's own final RMSNorm of each row.
    """

    def __init__(self, model: torch.nn.Module, mode: str, output: torch.Tensor, target: int):
        norm = model.model.norm
        self.w_u, self.target, self.mode = unembedding(model), target, mode
        self.gamma, self.eps = norm.weight.float(), norm.variance_epsilon
        self.scale = torch.rsqrt(torch.sqrt(torch.var(output, unbiased=False) + 1e-5) + 1e-6)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "rmsnorm":
            return self.gamma * (x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps))
        return self.gamma * (x * self.scale)

    def shift(self, base: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``normalize(base + delta) - normalize(base)`` ``[n, d]``, without subtracting two close vectors."""
        if self.mode != "rmsnorm":
            return self.gamma * (delta * self.scale)
        ms = base.square().mean(-1, keepdim=True) + self.eps
        growth = (delta * (2 * base + delta)).mean(-1, keepdim=True) / ms  # ms(base + delta) / ms(base) - 1
        ratio_m1 = torch.expm1(-0.5 * torch.log1p(growth))  # rms(base) / rms(base + delta) - 1
        return self.gamma * (torch.rsqrt(ms) * (ratio_m1 * base + (1 + ratio_m1) * delta))

    def logits(self, y: torch.Tensor) -> torch.Tensor:
        return torch.matmul(y.to(self.w_u.dtype), self.w_u.T).float()

    def log_probs(self, base: torch.Tensor) -> torch.Tensor:
        """``log_softmax(phi(base))`` ``[n, V]``."""
        return torch.log_softmax(self.logits(self.normalize(base)), dim=-1)

    def gain(self, base: torch.Tensor, delta: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
        """``log p(w | base + delta) - log p(w | base)`` ``[n]`` for ``base [n|1, d]``, ``delta [n, d]`` and
        ``log_probs = log_softmax(phi(base)) [n|1, V]``.

        With ``u`` the change of logits and ``t = max(0, max u)`` the gain is ``u_w - t - log1p(s)``,
        ``s = sum_v p_v expm1(u_v - t)``: a small change keeps its precision instead of being the difference of
        two log-probabilities of size ``log V``. Rows with ``s < -1/2`` (a large change, where ``1 + s`` would
        cancel) take the direct ``logsumexp(u + log p)`` instead.
        """
        y = self.shift(base, delta)
        u = self.logits(y)  # [n, V]
        u_target = u[:, self.target].clone()
        top = u.amax(dim=1, keepdim=True).clamp_(min=0)
        s = u.sub_(top).expm1_().mul_(log_probs.exp()).sum(dim=1)
        lse = top[:, 0] + torch.log1p(s)
        far = torch.nonzero(s < -0.5)[:, 0]
        if far.numel():
            lp = log_probs if log_probs.shape[0] == 1 else log_probs[far]
            lse[far] = torch.logsumexp(self.logits(y[far]) + lp, dim=1)
        return u_target - lse


def neuron_scores(base: torch.Tensor, coef: torch.Tensor, columns: list[torch.Tensor], log_probs: torch.Tensor,
                  proj: Projection, chunk: int) -> torch.Tensor:
    """``[L, n]``: the gain of adding ``coef_{l,i} W_l[:, i]`` to ``base_l`` for output weights ``W_l [d, n]``
    (``log_probs [L, V]`` = log_softmax at each base), in blocks of ``chunk`` neurons."""
    n_l, n = coef.shape
    out = torch.empty(n_l, n, dtype=torch.float32, device=coef.device)
    for layer, w in enumerate(columns):
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            delta = coef[layer, start:stop, None] * w[:, start:stop].T.float()
            out[layer, start:stop] = proj.gain(base[layer][None], delta, log_probs[layer][None])
    return out


def _check(mode: str, attention: str, chunk: int) -> None:
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is unknown; choose one of {MODES}.")
    if attention not in ATTENTION:
        raise ValueError(f"attention {attention!r} is unknown; choose one of {ATTENTION}.")
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be positive.")


@torch.no_grad()
def attribution(model: torch.nn.Module, input_ids: torch.Tensor, target_id: int, mode: str = "reference",
                attention: str = "last_key", chunk: int = DEFAULT_CHUNK,
                attention_mask: torch.Tensor | None = None) -> Scores:
    """Layer and neuron scores of one example: ``input_ids [1, T]`` (or ``[T]``), target token ``target_id``."""
    _check(mode, attention, chunk)
    ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    rec = capture(model, ids, attention_mask)
    proj = Projection(model, mode, rec.output, int(target_id))
    p_h, p_r = proj.log_probs(rec.h), proj.log_probs(rec.r)  # [L, V] each
    layers = model.model.layers
    down = [layer.mlp.down_proj.weight for layer in layers]
    o_proj = [layer.self_attn.o_proj.weight for layer in layers]
    values = rec.head_last_key if attention == "last_key" else rec.head_all_keys
    return Scores(layer_attn=proj.gain(rec.h, rec.a, p_h), layer_ffn=proj.gain(rec.r, rec.ffn_out, p_r),
                  ffn=neuron_scores(rec.r, rec.coeff, down, p_r, proj, chunk),
                  attn=neuron_scores(rec.h, values, o_proj, p_h, proj, chunk))
