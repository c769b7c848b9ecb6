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


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_written_files_get_the_mode_open_would_give(tmp_path, mask):
    """mkstemp alone gives 0600; an atomic write must honour the umask like a plain open()."""
    import os

    old = os.umask(mask)
    try:
        atomic_write_bytes(tmp_path / "atomic", b"x")
        (tmp_path / "plain").write_bytes(b"x")
    finally:
        os.umask(old)
    mode = lambda name: (tmp_path / name).stat().st_mode & 0o777  # noqa: E731
    assert mode("atomic") == mode("plain") == 0o666 & ~mask
