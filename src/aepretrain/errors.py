"""The one exception type for mistakes a user can cause; the CLI prints it as one line."""


class UserError(Exception):
    """A wrong path, a bad image, an unknown setting: something the user can fix.

    The message is one line that says what went wrong and where.
    """
