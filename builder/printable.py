"""Text from images and guests (file names, package names, a serial console) shown on a
terminal or in Markdown: control and format characters as visible escapes, so that none can
move the cursor, rewrite earlier lines, set the clipboard or hide text."""

from __future__ import annotations

import unicodedata


def printable(value: str, keep_tabs: bool = False) -> str:
    """Every character of Unicode category C (escapes, newlines, bidi overrides) shown as
    \\xNN or \\uNNNN."""
    return "".join(c if unicodedata.category(c)[0] != "C" or (keep_tabs and c == "\t")
                   else _escaped(c) for c in value)


def _escaped(char: str) -> str:
    return f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"
