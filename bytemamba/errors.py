"""The one exception family the command line turns into a one-line message and a non-zero exit.

Anything else that escapes is a bug in bytemamba and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: a missing or corrupt file, a wrong key, a mismatched checkpoint ..."""
