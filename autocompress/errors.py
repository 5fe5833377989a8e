"""The one exception type for problems a user can fix (bad path, bad option, stale artifact).

The CLI prints its message as a single line and exits with status 2; library callers can
catch it. Anything else escaping is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input; the message names what is wrong and what would be right."""
