"""Errors raised for bad user input (checkpoints, parameters); messages name the file and key at fault."""


class CheckpointError(ValueError):
    """A checkpoint directory cannot be loaded: the message names the file and the key."""


class TokenizerMissingError(RuntimeError):
    """A text prompt was given but the checkpoint ships no tokenizer files."""


class ParallelError(RuntimeError):
    """A tensor-parallel worker died, raised, or stopped answering: the model can no longer run."""
