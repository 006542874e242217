"""What every subcommand's parser shares."""

from __future__ import annotations

import argparse
import logging
import re
import sys

from builder.errors import InputError


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every bad input
        self.print_usage(sys.stderr)
        raise InputError(f"{self.prog}: {message}")


def regex(text: str) -> str:
    """An argument that must be a regular expression (--expect): refused as bad input."""
    try:
        re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a regular expression ({exc})") \
            from None
    return text


def configure_logging(verbose: bool) -> None:
    """-v shows amiforge's own messages; other libraries' (sh, botocore) stay at warnings."""
    logging.basicConfig(format="    %(message)s", stream=sys.stderr)
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("amiforge").setLevel(logging.DEBUG if verbose else logging.WARNING)
