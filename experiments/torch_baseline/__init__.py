"""A PyTorch baseline of LaTen (SPEC §3.1–§3.6) and of one LoRA training step (SPEC §4) on ``transformers`` models.

Stages, one module each: :mod:`.locate` (attribution scores), :mod:`.selection` (select and extract),
:mod:`.align` (hypernetworks, injection, one aligner step) and :mod:`.lora` (one LoRA step with ``peft``).
"""

from experiments.torch_baseline.align import (aligner_loss, aligner_step, injected_weights, make_aligner,
                                              make_optimizer)
from experiments.torch_baseline.locate import LastPosition, Scores, attribution, capture
from experiments.torch_baseline.selection import Picked, extract, select, top_indices

__all__ = ["LastPosition", "Picked", "Scores", "aligner_loss", "aligner_step", "attribution", "capture", "extract",
           "injected_weights", "make_aligner", "make_optimizer", "select", "top_indices"]
