"""The one exception type for bad input: the CLI prints its message on one line and exits 2."""


class SambaEdgeError(Exception):
    """A user-facing problem (bad file, bad option, mismatched model). The message names the fix."""
