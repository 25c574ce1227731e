"""The one exception type for mistakes a user can fix (bad path, bad flag, unsupported model).

The CLI turns it into a short message on stderr and exit code 2; anything else is a bug and keeps
its traceback.
"""


class FerryError(Exception):
    """A problem with the user's input, explained in the message."""
