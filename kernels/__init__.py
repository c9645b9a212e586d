"""Compute kernels. Each op has a plain-PyTorch reference beside its fast path."""
