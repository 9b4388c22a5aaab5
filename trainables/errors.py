"""Project exceptions.

Every error a user can cause is one of these, carrying one sentence the user can
act on. The CLI prints that sentence without a traceback and exits 2. They live
in ``trainables`` (the bottom of the import graph) so that workers, analysis and
the driver all raise the same types.
"""


class UnitstudyError(Exception):
    """Base class for errors caused by the user's input or environment."""


class ConfigError(UnitstudyError):
    """A configuration value is missing, unknown or out of range."""


class LayerNameError(ConfigError):
    """A layer was addressed by a name the model does not have."""


class DataError(UnitstudyError):
    """A dataset is missing, unreadable or inconsistent."""


class CheckpointError(UnitstudyError):
    """A checkpoint is missing, corrupt or belongs to another model."""
