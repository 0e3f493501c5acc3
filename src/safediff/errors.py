"""User-facing errors.

Anything a user can cause (a bad path, a bad override, an empty prompt file) raises
`SafediffError` with a one-line message that says what was wrong and how to fix it. The CLI
prints that line and exits with status 2 instead of showing a traceback.
"""


class SafediffError(Exception):
    """An error caused by input, configuration or environment, with an actionable message."""
