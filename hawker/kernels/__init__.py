"""Kernels: Triton ones for the GPU path, small C ones for the CPU path.

The Triton kernels are tested on CPU under ``TRITON_INTERPRET=1`` against
the torch reference (tests/kernels/test_triton_kernels.py); importing one needs
``triton``, which the CPU path never does. The C kernels (``csrc/``, built
on first use by ``native.py``) need only a C compiler, and the CPU path
falls back to torch without one.
"""
