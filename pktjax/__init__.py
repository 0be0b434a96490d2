"""pktjax: cross-scale parametric knowledge transfer (LaTen and Seeking) between LLMs, in JAX."""

from pktjax.checkpoint import Model, load_model, save_model
from pktjax.config import ModelConfig
from pktjax.errors import CheckpointError, ConfigError, DataError, PairError, PktjaxError
from pktjax.model import Trace, forward
from pktjax.tokenizer import load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "DataError", "Model", "ModelConfig", "PairError", "PktjaxError", "Trace",
    "forward", "load_model", "load_tokenizer", "save_model",
]
