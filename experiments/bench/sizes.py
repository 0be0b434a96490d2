"""Teacher/student shapes of the benchmark, with the workload sizes that go with them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    """A Llama-2 style decoder (multi-head attention, untied head). Random matrices are drawn with std
    ``1/sqrt(d)`` (``transformers``' default 0.02 barely moves a narrow model's residual, which leaves every
    attribution score near zero)."""

    hidden: int
    inter: int
    layers: int
    heads: int
    vocab: int

    def hf_config(self):
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.inter,
                           num_hidden_layers=self.layers, num_attention_heads=self.heads,
                           num_key_value_heads=self.heads, max_position_embeddings=4096, rms_norm_eps=1e-5,
                           bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                           initializer_range=self.hidden ** -0.5)

    def as_dict(self) -> dict[str, int]:
        return {"hidden": self.hidden, "inter": self.inter, "layers": self.layers, "heads": self.heads,
                "vocab": self.vocab}


@dataclass(frozen=True)
class Size:
    """A benchmark size: the pair, the attribution prompt length, the aligner batch (``P`` examples in
    micro-batches) and the LoRA batch, the transfer rate, and the dtype the random weights are stored in."""

    teacher: Shape
    student: Shape
    prompt_len: int
    train_len: int
    examples: int = 16
    micro_batch: int = 4
    lora_batch: int = 16
    lora_micro: int = 4
    rate: float = 0.1
    chunk: int = 512
    storage: str = "float32"
    note: str = ""


def floor_blocks(shape: Shape, chunk: int) -> int:
    """Blocks of ``chunk`` rows that cover the ``L (f + H*hd)`` neuron rows the attribution scores."""
    return -(-shape.layers * (shape.inter + shape.hidden) // chunk)


SIZES = {
    "tiny": Size(Shape(64, 176, 4, 4, 1024), Shape(48, 128, 3, 3, 1024), prompt_len=32, train_len=32,
                 lora_micro=8, chunk=128, note="d 64 -> 48, vocabulary 1024"),
    "tenth": Size(Shape(512, 1384, 40, 4, 32000), Shape(384, 1104, 32, 3, 32000), prompt_len=128, train_len=64,
                  note="1/10 of Llama-2 13B -> 7B widths (head_dim 128), vocabulary 32000"),
    "llama2-13b-7b": Size(Shape(5120, 13824, 40, 40, 32000), Shape(4096, 11008, 32, 32, 32000), prompt_len=256,
                          train_len=256, storage="bfloat16",
                          note="full Llama-2 13B -> 7B shapes (GPU only); random weights stored in bfloat16, "
                               "computed in float32"),
}
