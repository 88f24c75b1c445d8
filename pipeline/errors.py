"""Errors a user can fix: stages print their message (no traceback) and exit non-zero."""


class CascadeError(Exception):
    """Base class of errors whose message names the problem and the fix."""
