"""Command-line error reporting shared by the scripts and the tools: bad input is one line."""
import sys

from models import CheckpointError, UnknownModelError


class UsageError(RuntimeError):
    """Bad input from the user (missing data, unknown option value, ...): reported as one clear line."""


def run_main(main):
    """Call ``main()``; report user errors as ``error: ...`` and exit 2 instead of a traceback."""
    try:
        main()
    except (UsageError, CheckpointError, UnknownModelError) as err:
        print(f"error: {user_message(err)}", file=sys.stderr)
        sys.exit(2)


def user_message(err: Exception) -> str:
    """The error's own words.  One raised in a DataLoader worker reaches the main process with the
    worker's traceback in its message; the traceback's last line holds the words."""
    text = str(err)
    if "Original Traceback" in text:
        text = text.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return text
