"""Denoising strategies, as plug-ins.

- candidates.py: candidate tokens and the per-position statistics rules score from (ScoreStats), by the torch path,
  kernels/vocab.py's fused pass or the vocabulary shards' statistics; `combine_scores` applies each row's
  remasking rule.
- remasking/<rule>.py: one file per remasking (scoring) rule; transfer/<rule>.py: one file per transfer rule
  (how many / which positions a step commits). Each registers itself with registry.py, from which validation,
  the API enums, the CLI help and the docs come.
- select.py: the vectorised commit combiner (one pass per rule present in the batch).
- noise.py: counter-based noise keyed by (seed, step, position, column).
"""
