"""Checkpoints: what a run saves and resumes from, and what goes wrong with it.

  manager    Checkpointer: orbax steps of state + data iterator + metadata + checksums;
             resume from the newest readable step; failed saves in one line
  errors     the one-line failures (unreadable, failed save, incompatible) and the resume
             compatibility check (RESUME_KEYS)
  checksums  two 32-bit sums per array, computed on device, checked on restore; the
             finiteness check before every save and after every restore
"""

from kronjax.checkpoint.errors import (
                                       RESUME_KEYS,
                                       CheckpointSaveError,
                                       ChecksumMismatch,
                                       IncompatibleCheckpointError,
                                       NonFiniteStateError,
                                       UnreadableCheckpointError,
                                       check_compatible,
                                       describe_failure,
)
from kronjax.checkpoint.manager import UNREADABLE_SUFFIX, Checkpointer

__all__ = ["RESUME_KEYS", "UNREADABLE_SUFFIX", "CheckpointSaveError", "Checkpointer",
           "ChecksumMismatch", "IncompatibleCheckpointError", "NonFiniteStateError",
           "UnreadableCheckpointError",
           "check_compatible", "describe_failure"]
