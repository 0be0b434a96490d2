"""pktjax: cross-scale parametric knowledge transfer (LaTen and Seeking) between LLMs, in JAX."""

__version__ = "0.1.0"  # as in pyproject.toml

from pktjax.checkpoint import Model, load_model, save_model
from pktjax.config import ModelConfig
from pktjax.errors import CheckpointError, ConfigError, DataError, PairError, PktjaxError
from pktjax.model import Trace, forward
from pktjax.tokenizer import load_tokenizer
from pktjax.attribution import attribution, attribution_batch, attribution_target, locate, locate_each
from pktjax.select import Attribution, Selection, select
from pktjax.sensitivity import sensitivity
from pktjax import lora, seeking
from pktjax import analysis
from pktjax.extract import extract
from pktjax.align import align, init_aligner
from pktjax.inject import inject
from pktjax.train_aligner import TrainConfig, train_aligner
from pktjax.fuse import fuse
from pktjax import sandbox
from pktjax.generate import generate
from pktjax.evaluate import evaluate

__all__ = [
    "CheckpointError", "ConfigError", "DataError", "Model", "ModelConfig", "PairError", "PktjaxError", "Trace",
    "forward", "load_model", "load_tokenizer", "save_model",
    "lora", "seeking", "sensitivity",
    "analysis",
    "TrainConfig", "align", "extract", "fuse", "init_aligner", "inject", "train_aligner",
    "Attribution", "Selection", "attribution", "attribution_batch", "attribution_target", "locate", "locate_each",
    "select",
    "evaluate", "generate", "sandbox",
]
