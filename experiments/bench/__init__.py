"""Side-by-side benchmark of pktjax and the PyTorch baseline: ``python -m experiments.bench --help``."""
