"""Triton kernels for the GPU path.

Tested on CPU under ``TRITON_INTERPRET=1`` against the torch reference
(tests/test_triton_kernels.py). Importing a kernel module needs ``triton``;
the CPU path never imports them.
"""
