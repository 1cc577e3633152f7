"""The size-bounded log writer (engine/logs.py)."""
from __future__ import annotations

from engine.logs import RotatingWriter


def test_rotates_at_line_boundaries_and_keeps_the_backups(tmp_path):
    w = RotatingWriter(tmp_path / "engine.log", max_bytes=100, backups=2)
    lines = [f"line {i:03d} {'x' * 20}\n".encode() for i in range(40)]          # 30 bytes each
    for line in lines:
        w.write(line)
    w.write(b"".join(lines[:10]))                                                 # one big write
    w.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["engine.log", "engine.log.1", "engine.log.2"]
    for name in files:
        data = (tmp_path / name).read_bytes()
        assert 0 < len(data) <= 100 and data.endswith(b"\n")                       # whole lines only
    newest = (tmp_path / "engine.log.1").read_bytes() + (tmp_path / "engine.log").read_bytes()
    assert newest.endswith(b"".join(lines[:10])[-len(newest):])


def test_a_line_longer_than_a_file_is_cut(tmp_path):
    w = RotatingWriter(tmp_path / "e.log", max_bytes=64, backups=1)
    w.write(b"y" * 200 + b"\n")
    w.close()
    assert all(p.stat().st_size <= 64 for p in tmp_path.iterdir())


def test_appends_to_an_existing_file(tmp_path):
    (tmp_path / "e.log").write_bytes(b"old\n")
    w = RotatingWriter(tmp_path / "e.log", max_bytes=1000, backups=1)
    w.write(b"new\n")
    w.close()
    assert (tmp_path / "e.log").read_bytes() == b"old\nnew\n"
