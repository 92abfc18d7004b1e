"""The store's bounded cache (model-free): entries come back whole or not at all, damaged ones are dropped, the
least recently used go first, and keys cannot collide by shifting bytes between parts."""

from __future__ import annotations

import os
import time

from medgemma_cli.disk_cache import DiskCache, cache_key

A, B, C = (cache_key(name) for name in ("a", "b", "c"))


def test_an_entry_comes_back_as_written(tmp_path):
    cache = DiskCache(tmp_path, 1 << 20)
    assert cache.get("things", A) is None
    cache.put_bytes("things", A, b"payload")
    path = cache.get("things", A)
    assert path is not None and path.read_bytes() == b"payload"
    assert cache.usage().entries == 1


def test_a_cut_or_altered_entry_is_a_miss_and_is_removed(tmp_path):
    cache = DiskCache(tmp_path, 1 << 20)
    for damage in (lambda p: p.write_bytes(p.read_bytes()[:-3]),  # cut short
                   lambda p: p.write_bytes(b"X" + p.read_bytes()[1:]),  # same length, other bytes
                   lambda p: p.with_name(p.name + ".sum").unlink()):  # killed before the sum was written
        path = cache.put_bytes("things", A, b"0123456789")
        assert path is not None
        damage(path)
        assert cache.get("things", A) is None
        assert not path.exists() and not path.with_name(path.name + ".sum").exists()


def test_least_recently_used_entries_go_first(tmp_path):
    cache = DiskCache(tmp_path, 2 * 1000 + 2 * 200)  # room for two 1000-byte entries and their sums
    cache.put_bytes("things", A, b"a" * 1000)
    time.sleep(0.01)
    cache.put_bytes("things", B, b"b" * 1000)
    time.sleep(0.01)
    assert cache.get("things", A) is not None  # A is now the more recently used
    time.sleep(0.01)
    cache.put_bytes("things", C, b"c" * 1000)
    assert cache.get("things", B) is None
    assert cache.get("things", A) is not None and cache.get("things", C) is not None


def test_an_entry_larger_than_the_cache_is_not_kept(tmp_path):
    cache = DiskCache(tmp_path, 100)
    assert cache.put_bytes("things", A, b"x" * 101) is None
    assert cache.get("things", A) is None and cache.usage().entries == 0
    assert not [p for p in (tmp_path / "things").iterdir() if p.name.startswith(".")]  # no temporary left


def test_clear_empties_the_cache(tmp_path):
    cache = DiskCache(tmp_path, 1 << 20)
    cache.put_bytes("things", A, b"1")
    cache.put_bytes("other", B, b"22")
    cleared = cache.clear()
    assert cleared.entries == 2 and cache.usage().entries == 0
    assert all(not files for _, _, files in os.walk(tmp_path))


def test_keys_separate_their_parts():
    assert cache_key("ab", "c") != cache_key("a", "bc")
    assert cache_key(b"\x00") != cache_key(b"\x00\x00")
    assert cache_key("same") == cache_key(b"same")
