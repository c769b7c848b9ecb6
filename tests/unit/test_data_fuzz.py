"""Fuzz `validate_dataset` with hypothesis: bad image bytes never crash it, and always get named."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from fluxlab import data

_FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _valid(fmt: str) -> bytes:
    a = np.random.default_rng(1).integers(0, 256, (72, 80, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format=fmt)
    return buf.getvalue()


PNG, JPEG = _valid("PNG"), _valid("JPEG")


def _validate_one(name: str, content: bytes) -> data.DatasetReport:
    """Validate a folder holding just `name` (with a good caption, so only the image can be wrong)."""
    with tempfile.TemporaryDirectory() as d:   # hypothesis reuses function-scoped fixtures across examples
        (Path(d) / name).write_bytes(content)
        (Path(d) / name).with_suffix(".txt").write_text("a caption")
        return data.validate_dataset(d)


def _decodes(content: bytes) -> bool:
    """Independent check: does Pillow, limited to our formats, decode these bytes completely?"""
    try:
        with Image.open(io.BytesIO(content), formats=data.ALLOWED_FORMATS) as im:
            im.load()
            return min(im.size) >= data.MIN_SIDE
    except Exception:  # noqa: BLE001
        return False


@_FUZZ
@given(content=st.binary(max_size=4096), ext=st.sampled_from([".png", ".jpg", ".webp", ".gif", ".tif"]))
def test_random_bytes_are_reported_not_raised(content, ext):
    report = _validate_one("x" + ext, content)
    if not _decodes(content):
        assert [i.file for i in report.errors] == ["x" + ext], report.to_dict()


@_FUZZ
@given(fmt=st.sampled_from(["png", "jpg"]), frac=st.floats(0.0, 1.0, exclude_max=True))
def test_truncated_prefixes_are_errors(fmt, frac):
    full = PNG if fmt == "png" else JPEG
    cut = full[: int(len(full) * frac)]
    report = _validate_one("x." + fmt, cut)
    assert [i.file for i in report.errors] == ["x." + fmt], (len(cut), len(full), report.to_dict())


@_FUZZ
@given(fmt=st.sampled_from(["png", "jpg"]), data_=st.data())
def test_flipped_bytes_never_crash(fmt, data_):
    full = bytearray(PNG if fmt == "png" else JPEG)
    for pos in data_.draw(st.lists(st.integers(0, len(full) - 1), min_size=1, max_size=8, unique=True)):
        full[pos] ^= 0xFF
    report = _validate_one("x." + fmt, bytes(full))
    # A JPEG with flipped bytes in its entropy data can still decode; a PNG's CRCs always catch it.
    if fmt == "png" or not _decodes(bytes(full)):
        assert [i.file for i in report.errors] == ["x." + fmt]
