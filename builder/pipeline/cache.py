"""The stage cache: stage outputs kept under a hash of their inputs (osbuild's idea), so a
rebuild starts from the newest stage whose inputs did not change.

Layout under the cache root (``$XDG_CACHE_HOME/amiforge`` or ``--cache-dir``)::

    stages/<stage>/<key>/        the output (a tree or image files) and meta.json
    stages/<stage>/.tmp-*        entries being written (renamed into place when complete)
    locks/<stage>-<key>.lock     held (shared) while an entry is used; pruning skips it
    locks/<stage>-<key>.make     held (exclusive) while an entry is made

Entries are immutable once renamed into place: consumers copy trees they modify and only
read the rest. A lock per key makes two builds that need the same entry make it once; an
interrupted build leaves at most a ``.tmp-*`` folder, which pruning removes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.errors import InputError
from builder.host.run import run

META = "meta.json"
# inputs whose change -v says in words
DESCRIBED = {"archive": "the archive changed (a suite's package index is another)"}
BASE = "base.json"  # a layered tree entry names the entry it was layered over
KEY_LENGTH = 24


def digest(inputs: Any) -> str:
    """The key of a stage: sha256 of its inputs as canonical JSON."""
    text = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_LENGTH]


@dataclass(frozen=True)
class Entry:
    stage: str
    key: str
    path: Path

    @property
    def meta(self) -> dict[str, Any]:
        return json.loads((self.path / META).read_text())


class StageCache:
    def __init__(self, root: Path):
        self.root = root
        check_private(root)

    def _stage_dir(self, stage: str) -> Path:
        return self.root / "stages" / stage

    def path(self, stage: str, key: str) -> Path:
        return self._stage_dir(stage) / key

    def lookup(self, stage: str, key: str) -> Entry | None:
        path = self.path(stage, key)
        if (path / META).is_file():
            os.utime(path)  # recently used: pruned last
            return Entry(stage, key, path)
        return None

    @contextlib.contextmanager
    def in_use(self, stage: str, key: str) -> Iterator[None]:
        """Held (shared) while a build reads or makes an entry: pruning skips it."""
        with self._flock(f"{stage}-{key}.lock", fcntl.LOCK_SH):
            yield

    @contextlib.contextmanager
    def making(self, stage: str, key: str) -> Iterator[None]:
        """Held (exclusive) while an entry is made, so that builds needing the same entry
        at once make it once; readers of existing entries never wait for it."""
        with self._flock(f"{stage}-{key}.make", fcntl.LOCK_EX):
            yield

    @contextlib.contextmanager
    def _flock(self, name: str, operation: int) -> Iterator[None]:
        locks = self.root / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        fd = os.open(locks / name, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, operation)
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def new_entry(self, stage: str, key: str, inputs: Any) -> Iterator[Path]:
        """A folder to fill; renamed into place as the entry when the block succeeds."""
        stage_dir = self._stage_dir(stage)
        stage_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=stage_dir))
        try:
            yield tmp
            (tmp / META).write_text(json.dumps(
                {"stage": stage, "key": key, "created": time.time(), "inputs": inputs,
                 "id": uuid.uuid4().hex},  # this entry, not another made from the same key
                indent=2, sort_keys=True, default=str))
            try:
                os.rename(tmp, stage_dir / key)
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def entry_id(self, stage: str, key: str) -> str | None:
        """The id of the entry stored under ``key`` now (None: there is none)."""
        try:
            return json.loads((self.path(stage, key) / META).read_text()).get("id")
        except (OSError, ValueError):
            return None

    def orphaned(self, stage: str, key: str) -> bool:
        """A layered entry whose base entry is gone or was made again: no build can use it
        (a build using it would hold its base)."""
        base = base_of(self.path(stage, key))
        return base is not None and self.entry_id(base[0], base[1]) != base[2]

    def discard(self, stage: str, key: str) -> None:
        """Remove an entry nobody can use (a layered tree whose base is gone)."""
        trash = self._stage_dir(stage) / f".tmp-discard-{key}-{uuid.uuid4().hex[:8]}"
        with contextlib.suppress(FileNotFoundError):
            os.rename(self.path(stage, key), trash)
            shutil.rmtree(trash, ignore_errors=True)

    def why_missed(self, stage: str, inputs: dict[str, Any]) -> str:
        """Which inputs differ from the newest entry of this stage (for ``-v``)."""
        try:
            return self._why_missed(stage, inputs)
        except (OSError, ValueError):  # a prune removed entries meanwhile
            return "cannot tell (the cache changed meanwhile)"

    def _why_missed(self, stage: str, inputs: dict[str, Any]) -> str:
        entries = [p for p in self._stage_dir(stage).glob("*") if (p / META).is_file()]
        if not entries:
            return "no cached entry for this stage yet"
        wanted = {k: digest(v) for k, v in inputs.items()}

        def differences(entry: Path) -> list[str]:
            previous = json.loads((entry / META).read_text()).get("inputs", {})
            return sorted(k for k in set(previous) | set(inputs)
                          if digest(previous.get(k)) != wanted.get(k, digest(None)))

        # the nearest entry (a cache shared by several recipes: the newest entry may be
        # another recipe's), the newest of those equally near
        newest_first = sorted(entries, key=lambda p: -p.stat().st_mtime)
        changed = min((differences(p) for p in newest_first), key=len)
        if not changed:
            return "changed: nothing (the entry cannot be used here)"
        said = [DESCRIBED[k] for k in changed if k in DESCRIBED]
        rest = [k for k in changed if k not in DESCRIBED]
        return "; ".join([*said, *(["changed: " + ", ".join(rest)] if rest else [])])

    def entries(self) -> list[Entry]:
        out = []
        for stage_dir in sorted((self.root / "stages").glob("*")):
            for path in stage_dir.glob("*"):
                if (path / META).is_file():
                    out.append(Entry(stage_dir.name, path.name, path))
        return out

    def size(self) -> int:
        return sum(_disk_usage(e.path) for e in self.entries())

    def prune(self, max_size: int = 0) -> list[Entry]:
        """Remove least recently used entries until the cache is at most ``max_size``
        bytes; entries in use by a running build are skipped. Stale ``.tmp-*`` folders of
        interrupted builds go too."""
        removed = []
        for stale in (self.root / "stages").glob("*/.tmp-*"):
            with contextlib.suppress(FileNotFoundError):
                if time.time() - stale.stat().st_mtime > 3600:
                    shutil.rmtree(stale, ignore_errors=True)
        entries = sorted(self.entries(), key=_mtime)
        sizes = {e.path: _disk_usage(e.path) for e in entries}
        total = sum(sizes.values())
        for entry in entries:
            if total <= max_size:
                break
            if self._remove_unless_locked(entry):
                total -= sizes[entry.path]
                removed.append(entry)
        return removed + self._prune_orphans()

    def _prune_orphans(self) -> list[Entry]:
        """Layered entries whose base went (pruned now or earlier), down the chain."""
        removed: list[Entry] = []
        while orphans := [e for e in self.entries() if self.orphaned(e.stage, e.key)]:
            gone = [e for e in orphans if self._remove_unless_locked(e)]
            removed += gone
            if not gone:  # the rest are in use
                break
        return removed

    def _remove_unless_locked(self, entry: Entry) -> bool:
        try:
            with self._flock(f"{entry.stage}-{entry.key}.lock",
                             fcntl.LOCK_EX | fcntl.LOCK_NB):
                trash = entry.path.with_name(f".tmp-prune-{entry.key}")
                os.rename(entry.path, trash)  # atomic: readers never see half an entry
                shutil.rmtree(trash, ignore_errors=True)
                return True
        except BlockingIOError:  # in use by a build
            return False


def base_of(entry: Path) -> tuple[str, str, str | None] | None:
    """(stage, key, entry id) of the entry a layered tree entry lies over (None: the entry
    holds a whole tree)."""
    try:
        stage, key, base_id = json.loads((entry / BASE).read_text())
    except (OSError, ValueError):
        return None
    return stage, key, base_id


def _mtime(entry: Entry) -> float:
    try:
        return entry.path.stat().st_mtime
    except FileNotFoundError:  # removed by another prune meanwhile
        return 0.0


def check_private(root: Path) -> None:
    """Refuse a cache that someone else could have planted entries in: the folder (and its
    first levels) must be ours and writable by no one else. Cached trees become images
    and run as root in chroots, so another user's cache is another user's code."""
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise InputError(f"{root}: the cache directory is not a folder") from None
    except PermissionError as exc:
        raise InputError(f"{root}: cannot create the cache directory: {exc.strerror}") from None
    euid = os.geteuid()
    for path in (root, *root.glob("*"), *root.glob("stages/*")):
        info = path.stat()  # a link (a shared apt-archives) is judged by what it points to
        if not stat.S_ISDIR(info.st_mode):
            continue
        if info.st_uid != euid or info.st_mode & 0o022:
            raise InputError(
                f"{path}: the cache directory must be owned by you (uid {euid}) and writable "
                f"by no one else (it is uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):o})"
                "; fix it or pass another --cache-dir")


def _disk_usage(path: Path) -> int:
    total = 0
    seen: set[tuple[int, int]] = set()
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            info = os.lstat(os.path.join(root, name))
            if (info.st_dev, info.st_ino) not in seen:
                seen.add((info.st_dev, info.st_ino))
                total += info.st_blocks * 512
    return total


def copy_tree(source: Path, target: Path) -> None:
    """A full copy (ownership, modes, links, xattrs) that the caller may modify."""
    run(["cp", "-a", "--reflink=auto", str(source), str(target)])


def place(source: Path, target: Path, how: str) -> None:
    """Put a stage's finished output into an entry: ``move`` it (its maker is done with
    it), ``link`` it (a file nobody modifies) or ``copy`` it (its maker changes it later).
    Moves and links between filesystems fall back to a copy."""
    try:
        if how == "move":
            os.rename(source, target)
            return
        if how == "link" and not source.is_dir():
            os.link(source, target)
            return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    copy_tree(source, target)
