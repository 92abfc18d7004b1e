from __future__ import annotations

import pytest

from medgemma_cli.atomic import AtomicFolder


def test_files_appear_only_on_success(tmp_path):
    out = tmp_path / "a" / "b"
    with AtomicFolder(out, ["x", "y"]) as f:
        f.temp("x").write_text("1")
        f.temp("y").write_text("2")
        f.scratch("big").write_text("tmp")
        assert not (out / "x").exists()
    assert sorted(p.name for p in out.iterdir()) == ["x", "y"]


def test_failure_removes_temporaries_and_created_folders(tmp_path):
    out = tmp_path / "a" / "b"
    with pytest.raises(RuntimeError), AtomicFolder(out, ["x"]) as f:
        f.temp("x").write_text("partial")
        raise RuntimeError("boom")
    assert not (tmp_path / "a").exists()


def test_interrupt_also_cleans_up(tmp_path):
    (tmp_path / "keep.txt").write_text("k")
    with pytest.raises(KeyboardInterrupt), AtomicFolder(tmp_path, ["x"]) as f:
        f.temp("x").write_text("partial")
        raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
