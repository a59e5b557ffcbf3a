"""The fused execution engine: the part a learner can skip. It takes a `Sequential` of `cnncli/nn/` and computes
the same functions as its per-layer path, several times faster (batch-minor tensors, fused conv → ReLU → pool
stages, blocked products, worker threads); `tests/test_speed_equivalence.py` holds it to the reference.
`executor` holds the engine, `calibrate` measures the micro-batch sizes it uses on this machine.
"""
