"""Sub-commands of the ``mergeflow`` CLI."""
