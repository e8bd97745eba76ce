"""Triton kernels (issue 3). Until then the engine runs the pure-torch ops in engine/ops.py."""
