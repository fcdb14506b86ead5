"""The one exception type that mergeflow raises for bad input."""


class MergeflowError(Exception):
    """Bad input: a config key, model, tensor, file or column that cannot be used.

    The message always names the culprit (file, key, tensor or column) so a user can fix it
    without reading a traceback.
    """


class OutputError(MergeflowError):
    """An output that cannot be written without destroying something: a non-empty directory
    (without ``--force``) or a directory of a model the job reads."""


class SourceFileError(MergeflowError):
    """A model's weight file that cannot be read (truncated, corrupt), named with its model."""


class DataError(MergeflowError):
    """A task's item that cannot be scored as configured, named with its task and item."""


class RecipeError(MergeflowError):
    """A merge recipe or search space that names a parameter or method nothing reads."""
