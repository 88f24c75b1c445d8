"""Errors a user can fix: stages print their message (no traceback) and exit non-zero."""


class CascadeError(Exception):
    """Base class of errors whose message names the problem and the fix."""

    transient = False
    """whether the same command may succeed when run again later (a network error): a stage then exits with
    stages.common.EXIT_TRANSIENT, which the pipeline flow retries"""
