"""The one exception the CLI turns into a one-line message and exit status 2."""


class UsageError(Exception):
    """Wrong input from the user: the message names the problem and what to do."""
