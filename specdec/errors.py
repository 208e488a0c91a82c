"""Errors a user can fix.

`UsageError` is raised for bad input (a setting out of range, an unknown name, a missing file)
before any expensive work starts. Its message is one line that says what to change; the
``specdec`` command line prints it without a traceback and exits with status 2.
"""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input a user can fix; the message says what to change."""
