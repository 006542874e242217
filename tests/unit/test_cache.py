"""The stage cache's bookkeeping: atomic entries, locking, LRU pruning, miss reasons."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path

import pytest

from builder.pipeline.cache import StageCache, digest


def make(cache: StageCache, stage: str, key: str, size: int = 1000, inputs: dict | None = None):
    with cache.making(stage, key), cache.new_entry(stage, key, inputs or {"k": key}) as entry:
        (entry / "data").write_bytes(b"x" * size)


def test_digest_is_canonical() -> None:
    assert digest({"a": 1, "b": [1, 2]}) == digest({"b": [1, 2], "a": 1})
    assert digest({"a": 1}) != digest({"a": 2})


def test_entry_appears_only_when_complete(tmp_path: Path) -> None:
    cache = StageCache(tmp_path)
    with pytest.raises(RuntimeError), cache.new_entry("s", "k1", {}) as entry:
        (entry / "data").write_text("half")
        raise RuntimeError("interrupted")
    assert cache.lookup("s", "k1") is None
    assert not list((tmp_path / "stages/s").glob(".tmp-*"))
    make(cache, "s", "k1")
    entry = cache.lookup("s", "k1")
    assert entry is not None and (entry.path / "data").read_bytes() == b"x" * 1000
    assert entry.meta["inputs"] == {"k": "k1"}


def test_second_writer_of_the_same_key_keeps_the_first(tmp_path: Path) -> None:
    cache = StageCache(tmp_path)
    make(cache, "s", "k", size=10)
    with cache.new_entry("s", "k", {}) as entry:
        (entry / "data").write_bytes(b"y")
    assert (cache.lookup("s", "k").path / "data").read_bytes() == b"x" * 10


def test_prune_removes_least_recently_used_first(tmp_path: Path) -> None:
    cache = StageCache(tmp_path)
    for i, key in enumerate(("old", "mid", "new")):
        make(cache, "s", key, size=100_000)
        os.utime(tmp_path / "stages/s" / key, (1000 + i, 1000 + i))
    cache.lookup("s", "old")  # used now: newest
    removed = cache.prune(max_size=250_000)
    assert [e.key for e in removed] == ["mid"]
    assert {e.key for e in cache.entries()} == {"old", "new"}


def test_prune_skips_entries_in_use(tmp_path: Path) -> None:
    cache = StageCache(tmp_path)
    make(cache, "s", "busy")
    make(cache, "s", "idle")
    with cache.in_use("s", "busy"):
        removed = cache.prune(0)
    assert [e.key for e in removed] == ["idle"]
    assert [e.key for e in cache.entries()] == ["busy"]


def test_lock_makes_concurrent_builders_wait(tmp_path: Path) -> None:
    cache = StageCache(tmp_path)
    made: list[str] = []

    def builder(name: str) -> None:
        with cache.making("bootstrap", "same"):
            if cache.lookup("bootstrap", "same") is None:
                time.sleep(0.3)
                made.append(name)
                with cache.new_entry("bootstrap", "same", {}) as entry:
                    (entry / "tree").mkdir()

    threads = [threading.Thread(target=builder, args=(n,)) for n in ("a", "b", "c")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(made) == 1


def test_why_missed_names_changed_inputs(tmp_path: Path) -> None:
    cache = StageCache(tmp_path)
    make(cache, "configure", "k1", inputs={"files": 1, "users": 2, "scripts": 3})
    assert cache.why_missed("configure", {"files": 9, "users": 2, "scripts": 3}) == \
        "changed: files"
    assert cache.why_missed("other", {}) == "no cached entry for this stage yet"


def test_why_missed_compares_with_the_nearest_entry(tmp_path: Path) -> None:
    """A cache several recipes share: the newest entry is another recipe's, the nearest is
    this recipe's previous build."""
    cache = StageCache(tmp_path)
    make(cache, "configure", "mine", inputs={"files": 1, "users": 2, "scripts": 3})
    time.sleep(0.01)
    make(cache, "configure", "other", inputs={"files": 7, "users": 8, "scripts": 3})
    assert cache.why_missed("configure", {"files": 9, "users": 2, "scripts": 3}) == \
        "changed: files"
    assert cache.why_missed("configure", {"files": 1, "users": 8, "scripts": 4}) == \
        "changed: files, scripts"  # as near to both: the newest


def test_lock_files_use_flock(tmp_path: Path) -> None:
    cache = StageCache(tmp_path)
    with cache.making("s", "k"), cache.in_use("s", "k"):
        for name, readers_may_share in (("s-k.make", False), ("s-k.lock", True)):
            fd = os.open(tmp_path / "locks" / name, os.O_RDWR)
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if readers_may_share:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            os.close(fd)


@pytest.mark.parametrize("how", ["writable by others", "owned by another user",
                                 "stage folder writable by others"])
def test_a_cache_others_could_write_is_refused(tmp_path: Path, how: str) -> None:
    from builder.errors import InputError

    root = tmp_path / "cache"
    (root / "stages/bootstrap").mkdir(parents=True)
    if how == "writable by others":
        root.chmod(0o777)
    elif how == "owned by another user":
        os.chown(root, 65534, 65534)
    else:
        (root / "stages/bootstrap").chmod(0o757)
    with pytest.raises(InputError, match="writable by no one else"):
        StageCache(root)


def test_a_new_cache_is_private(tmp_path: Path) -> None:
    StageCache(tmp_path / "new")
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o700
