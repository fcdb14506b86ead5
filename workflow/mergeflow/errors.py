"""The one exception type that mergeflow raises for bad input."""


class MergeflowError(Exception):
    """Bad input: a config key, model, tensor, file or column that cannot be used.

    The message always names the culprit (file, key, tensor or column) so a user can fix it
    without reading a traceback.
    """
