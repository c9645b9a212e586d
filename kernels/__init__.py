"""Compute kernels. Each op has a plain-PyTorch reference beside its Triton fast path.

attention.py  paged varlen flash attention + K/V store      moe.py    fused MoE (align, grouped GEMMs)
vocab.py      one-pass candidate / scores over the vocab     dispatch.py  kernels="auto" | "triton" | "torch"
"""
