"""Remasking (scoring) rules, one file each: each registers a `Remasking` (engine/decoding/registry.py) scoring
the positions of a step from its ScoreStats. Files here are discovered automatically."""
