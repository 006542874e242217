"""The Jinja2 templates amiforge itself renders (fstab, grub.cfg, apt sources, ...).

They live in the top-level ``templates/`` folder of a source checkout and are installed as
``builder/templates`` in a wheel. These are amiforge's own, trusted templates; recipe
values and recipe templates go through the sandbox in :mod:`builder.recipe.templating`."""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jinja2


def templates_dir() -> Path:
    package = Path(__file__).resolve().parent
    for candidate in (package / "templates", package.parent / "templates"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("amiforge's templates folder is missing from the installation")


_GRUB_PLAIN = re.compile(r"^[A-Za-z0-9_.,:=/+@%-]+$")


def grub_quote(value: object) -> str:
    """One word of a GRUB script: single-quoted unless plainly safe (GRUB's quoting is
    the shell's; a ``'`` inside is written ``'\\''``)."""
    text = str(value)
    if "\n" in text or "\r" in text:
        raise ValueError(f"a GRUB word cannot hold a line break: {text[:40]!r}")
    if _GRUB_PLAIN.match(text):
        return text
    return "'" + text.replace("'", "'\\''") + "'"


def fstab_escape(value: object) -> str:
    """One field of /etc/fstab: white space and backslashes as octal escapes (fstab(5))."""
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in str(value))


@functools.cache
def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(templates_dir()),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    environment.filters.update(grub=grub_quote, fstab=fstab_escape)
    return environment


def templates_digest(names: Iterable[str] | None = None) -> str:
    """The hash of the named templates, or of all of them (part of stage keys)."""
    paths = [templates_dir() / n for n in names] if names else templates_dir().glob("*")
    hasher = hashlib.sha256()
    for path in sorted(paths):
        hasher.update(path.name.encode() + b"\0" + path.read_bytes())
    return hasher.hexdigest()


def render_template(name: str, **context: Any) -> str:
    return _environment().get_template(name).render(**context)
