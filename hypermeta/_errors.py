"""The exceptions the CLI turns into a one-line message: bad input (exit 2) and a failed run (exit 1)."""


class UsageError(Exception):
    """Wrong input from the user: the message names the problem and what to do."""


class RunError(Exception):
    """A run that could not do its work (no trial finished, artifacts or storage unusable): exit status 1."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the signal arrives so that it ends the run as Ctrl-C does."""
