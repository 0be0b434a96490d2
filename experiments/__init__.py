"""Experiments around pktjax: a PyTorch baseline of LaTen and LoRA, and a side-by-side benchmark runner."""
