"""Executors: what runs a step's ForwardBatch (engine/forward_batch.py) on the model. The runner owns one.

base.py       the Executor interface the runner (and DiffusionModel.logits) calls
local.py      LocalExecutor: one process holds the whole model
config.py     ParallelConfig (tensor / expert parallelism), torchrun detection, per-rank devices
launch.py     start_parallel: spawn (or join, under torchrun) the ranks, load rank 0's shard, return its driver
rendezvous.py the process groups every rank joins (model collectives + the gloo control group)
tp_driver.py  TPExecutor: rank 0's side, one control broadcast per step, then its own shard
tp_worker.py  ranks > 0: load their shard, mirror rank 0's forwards until told to stop
memory.py     per-rank memory reports (parameters, KV pool, resident set)
"""
from .base import Executor
from .config import ParallelConfig, torchrun_rank
from .local import LocalExecutor

__all__ = ["Executor", "LocalExecutor", "ParallelConfig", "torchrun_rank"]
