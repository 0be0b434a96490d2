"""An lm-evaluation-harness model backed by pktjax, registered as ``pktjax``.

After ``import pktjax.lm_eval_model`` (the import registers the class), ``simple_evaluate(model="pktjax",
model_args="pretrained=PATH_OR_HUB_ID,batch_size=8", tasks=[...])`` (or ``model=PktjaxLM(...)``) runs any pktjax
model — a checkpoint folder, a GGUF file, a hub id, a fused student — for ``loglikelihood``,
``loglikelihood_rolling`` and ``generate_until``. Tokenization follows lm-eval's Hugging Face backend (the
tokenizer's own special tokens unless ``add_bos_token`` says otherwise; an empty context is the BOS token, else
EOS), so scores can be set beside that backend's. Needs ``pip install pktjax[lm_eval]``.

``mesh`` (a spec such as ``"fsdp=8"`` or ``"fsdp=4,tensor=2"``, or a :class:`jax.sharding.Mesh`) serves the model
sharded over devices by :mod:`pktjax.sharding`'s rules (weights loaded straight into their shardings); in
``model_args``, which lm-eval splits on commas, separate the axes with ``;``
(``model_args="pretrained=PATH,mesh=fsdp=4;tensor=2"``).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from pktjax import sharding as S
from pktjax.checkpoint import Model, load_model
from pktjax.evaluate import _left_pad
from pktjax.generate import generate_text
from pktjax.model import forward
from pktjax.tokenizer import load_tokenizer


@partial(jax.jit, static_argnames=("cfg",))
def _log_probs(params, cfg, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Log-probabilities ``[B, T, V]`` (float32) of the token after each position of left-padded ``ids [B, T]``."""
    return jax.nn.log_softmax(forward(params, cfg, ids, mask), axis=-1)


@register_model("pktjax")
class PktjaxLM(TemplateLM):
    """lm-eval's ``LM`` interface over a pktjax :class:`~pktjax.checkpoint.Model` (greedy ``generate_until``),
    on one device or sharded over ``mesh``."""

    def __init__(self, pretrained: str | Model, batch_size: int | str = 8, max_length: int | None = None,
                 add_bos_token: bool | None = None, tokenizer=None, mesh: str | Any | None = None, **kwargs: Any):
        super().__init__()
        mesh = S.as_mesh(mesh.replace(";", ",") if isinstance(mesh, str) else mesh)
        if isinstance(pretrained, Model):
            self.model = pretrained if mesh is None else pretrained.replace(params=S.shard(pretrained.params, mesh))
        else:
            self.model = load_model(pretrained, mesh=mesh)
        self.tokenizer = tokenizer or load_tokenizer(self.model.source)
        self.batch = int(batch_size) if str(batch_size).isdigit() else 8  # lm-eval's "auto" is not searched
        self._max_length = int(max_length or self.model.config.max_position_embeddings)
        self.add_bos_token = add_bos_token

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
            kw = {"add_special_tokens": False}  # the string already carries its BOS
        return list(self.tokenizer.encode(string, **kw))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """``(sum of log P(continuation tokens), whether each is the argmax)`` for ``(key, context, cont)``
        token lists; the sequence keeps its last ``max_length + 1`` tokens."""
        rows = []
        for _, ctx, cont in requests:
            whole = (list(ctx) + list(cont))[-(self.max_length + 1):]
            rows.append((whole[:-1], whole[-len(cont):]))
        out: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        for lo in range(0, len(order), self.batch):
            idx = order[lo:lo + self.batch]
            ids, mask = _left_pad([rows[i][0] for i in idx], self.eot_token_id)
            logp = np.asarray(_log_probs(self.model.params, self.model.config, jnp.asarray(ids), jnp.asarray(mask)))
            for row, i in enumerate(idx):
                cont = np.asarray(rows[i][1])
                lp = logp[row, ids.shape[1] - len(cont):]  # the positions that predict the continuation
                out[i] = (float(lp[np.arange(len(cont)), cont].sum()), bool((lp.argmax(-1) == cont).all()))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The whole text's log-likelihood, in disjoint windows of ``max_length`` tokens after the prefix token."""
        out = []
        for (text,) in [r.args for r in requests]:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text, add_special_tokens=False), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            out.append(sum(lp for lp, _ in self._loglikelihood_tokens([(None, c, t) for c, t in windows])))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy completions cut at the request's ``until`` strings (and EOS), up to ``max_gen_toks`` tokens."""
        out = []
        for context, gen_kwargs in [r.args for r in requests]:
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", 256))
            add = True if self.add_bos_token is None else self.add_bos_token
            gen = generate_text(self.model.params, self.model.config, self.tokenizer, [context], max_new,
                                stop=until, add_special_tokens=add, max_prompt_tokens=self.max_length - max_new)
            out.append(gen.texts[0])
        return out
