"""The one exception type for mistakes a user can make: bad input, bad artifacts, bad config.

The CLI turns it into one line on stderr and a non-zero exit; anything else is a bug and keeps its
traceback.
"""


class TempflowError(Exception):
    """A user-facing error. The message names the file or value, what was expected, and the fix."""
