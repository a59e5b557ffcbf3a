"""Benchmarks: timing cnncli's training step and inference (`timing`) and the same network in PyTorch side by side
(`torchbench`). Rendered by `cnncli/cli/bench.py`."""
