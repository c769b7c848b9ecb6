"""fluxlab._atomic: a failed write leaves the old file whole and no temp file behind."""

import pytest

from fluxlab._atomic import atomic_write_bytes, atomic_write_text


def test_write_replaces_and_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "sub" / "f.json"
    atomic_write_text(path, "old")
    assert path.read_text() == "old"
    with pytest.raises(TypeError):
        atomic_write_bytes(path, "not bytes")            # fails inside the write
    assert path.read_text() == "old"
    assert [p.name for p in path.parent.iterdir()] == ["f.json"]   # no .f.json.*.tmp left
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new"
