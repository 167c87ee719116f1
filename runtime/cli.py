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


def cfg_options_action():
    """The argparse action of ``--cfg-options KEY=VALUE ...``: mmengine's DictAction, with an item
    lacking ``=`` a usage error instead of a traceback (imported only where mmengine is)."""
    from mmengine.config import DictAction

    class KeyValueAction(DictAction):
        def __call__(self, parser, namespace, values, option_string=None):
            bad = [value for value in values if "=" not in value]
            if bad:
                parser.error(f"{option_string} takes KEY=VALUE items (e.g. train_cfg.max_epochs=12), got {bad[0]!r}")
            super().__call__(parser, namespace, values, option_string)

    return KeyValueAction


def user_message(err: Exception) -> str:
    """The error's own words.  One raised in a DataLoader worker reaches the main process with the
    worker's traceback in its message; the traceback's last line holds the words."""
    text = str(err)
    if "Original Traceback" in text:
        text = text.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return text
