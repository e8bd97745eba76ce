"""Triton kernels, each with a pure-torch reference; engine/ops.py's TritonOps runs them.

Named tandem_kernels, not kernels: transformers (5.25 on) depends on Hugging Face's
`kernels` package and imports it when it is installed, and a top-level `kernels` of ours
shadowed it there (every transformers model import failed) and would overwrite it in
site-packages."""
