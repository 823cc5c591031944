"""Errors of the export: every message names the file, path or option to fix."""


class ExportError(RuntimeError):
    """The export cannot proceed (bad path, existing output, mismatched files)."""


class IncompleteFileError(ExportError):
    """A file the export needs is missing, truncated or not in the expected format."""
