"""Exceptions whose message is a single line meant for the user (no traceback needed)."""


class DistillError(Exception):
    """Base class: the entry points print ``str(error)`` on one line and exit non-zero."""


class ConfigError(DistillError):
    """A config file, key, value or command-line override is wrong."""


class DataError(DistillError):
    """A data source, file, row or column is wrong; the message names the file and line (or dataset and row)."""


class CacheError(DistillError):
    """The teacher embedding cache cannot be used (e.g. its dimension disagrees with the teacher)."""


class CheckpointError(DistillError):
    """A checkpoint is missing, incomplete, or incompatible with the config."""


class Preempted(DistillError):
    """SIGTERM arrived (e.g. SLURM preemption): a checkpoint was saved and the run exits cleanly (status 0)."""
