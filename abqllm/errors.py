"""The one exception type users see: a problem with their input, stated with its fix.

The CLI prints `error: <message>` for these and exits non-zero; anything else is a bug and keeps
its traceback.
"""


class AbqError(Exception):
    """Bad input or an environment problem the user can fix; the message names both."""
