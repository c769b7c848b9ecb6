"""Fault injection, datasets, caches and the results store: links out of the dataset, huge and
control-character captions, JPEGs that are mostly decoder filler, hostile file names in the
report, wrong-kind cache entries, a corrupt entry evicted during training, and damaged stores."""

from __future__ import annotations

import copy
import json
import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fluxlab import caches, store
from fluxlab.cli import main
from fluxlab.data import MAX_CAPTION_BYTES, DatasetError, ImageCaptionDataset, validate_dataset

ROOT = Path(__file__).resolve().parents[2]


def _img(path: Path, seed: int = 0, size: int = 64, fmt: str = "PNG") -> Path:
    y, x = np.mgrid[0:size, 0:size]
    arr = np.stack([x * 4 % 256, y * 4 % 256, (x * y + seed * 37) % 256], -1).astype(np.uint8)
    Image.fromarray(arr).save(path, format=fmt, quality=90)
    return path


def _pair(root: Path, stem: str, caption: bytes | str, seed: int = 0) -> None:
    root.mkdir(parents=True, exist_ok=True)
    _img(root / f"{stem}.png", seed)
    cap = root / f"{stem}.txt"
    cap.write_bytes(caption.encode() if isinstance(caption, str) else caption)


def _problems(report, severity="errors") -> dict[str, str]:
    return {i.file: i.problem for i in getattr(report, severity)}


# --- confinement ---------------------------------------------------------------------------------
def test_a_caption_linked_outside_the_dataset_is_a_named_error_and_never_read(tmp_path):
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("TOP-SECRET-TEXT")
    ds = tmp_path / "ds"
    _pair(ds, "a", "a red circle")
    _img(ds / "b.png", 1)
    (ds / "b.txt").symlink_to(secret)
    report = validate_dataset(ds)
    assert not report.ok and "resolves outside the dataset folder" in _problems(report)["b.txt"]
    assert "TOP-SECRET-TEXT" not in json.dumps(report.to_dict())
    with pytest.raises(DatasetError, match=r"b\.txt: resolves outside"):
        ImageCaptionDataset(ds)


def test_an_image_or_folder_linked_outside_is_an_error_but_links_inside_are_fine(tmp_path):
    ds = tmp_path / "ds"
    _pair(ds, "a", "a red circle")
    outside = tmp_path / "elsewhere"
    _pair(outside, "c", "a green square", 2)
    (ds / "c.png").symlink_to(outside / "c.png")
    (ds / "c.txt").write_text("a green square")
    (ds / "sub").symlink_to(outside, target_is_directory=True)
    (ds / "inner.txt").symlink_to(ds / "a.txt")  # stays inside: allowed (a caption with no image)
    errors = _problems(validate_dataset(ds))
    assert "outside" in errors["c.png"]
    assert "outside" in errors["sub"]  # a linked folder is named, not silently skipped
    assert "inner.txt" not in errors


# --- captions -----------------------------------------------------------------------------------------
def test_a_huge_caption_is_refused_unread(tmp_path):
    ds = tmp_path / "ds"
    _pair(ds, "a", "a red circle")
    _pair(ds, "big", b"x" * (50 * 2**20), 1)  # 50 MB
    _pair(ds, "edge", b"y" * MAX_CAPTION_BYTES, 2)  # exactly the limit: allowed
    errors = _problems(validate_dataset(ds))
    assert "larger than" in errors["big.txt"] and "edge.txt" not in errors


@pytest.mark.parametrize("caption,severity,words", [
    ("a red\x00 circle", "errors", "NUL"),
    ("\x01\x02\x1b\x7f", "errors", "no printable text"),
    ("\x1c\x1d\x1e", "errors", "empty caption"),  # separators are whitespace to str.strip
    ("a red \x1b[31mcircle", "warnings", "control characters"),
])
def test_control_characters_and_nul_are_flagged(tmp_path, caption, severity, words):
    ds = tmp_path / "ds"
    _pair(ds, "a", caption)
    report = validate_dataset(ds)
    problems = _problems(report, severity)
    assert words in problems.get("a.txt", ""), (report.errors, report.warnings)


def test_a_long_caption_warns_at_training_that_it_is_truncated(pipe, shapes, tmp_path):
    from fluxlab.config import load_config
    from fluxlab.trainer import Trainer

    cfg = load_config(ROOT / "configs" / "tiny.yaml", {
        "data": str(shapes), "output_dir": str(tmp_path / "o"), "num_workers": "0", "progress": "false",
        "max_sequence_length": "64", "device": "cpu", "steps": "1"})
    lengths = [len(pipe.tokenizer_2(p.read_text().strip())["input_ids"]) for p in sorted(shapes.glob("*.txt"))]
    assert len(lengths) == 16 and max(lengths) <= 64  # these captions fit: no warning ...
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(cfg, pipe=copy.deepcopy(pipe)).setup()
    assert not [w for w in caught if "max_sequence_length" in str(w.message)]
    cfg.max_sequence_length = min(lengths) - 1  # ... and one token under the shortest, all 16 are
    with pytest.warns(UserWarning, match=r"16 caption\(s\) are longer than max_sequence_length"):
        Trainer(cfg, pipe=copy.deepcopy(pipe)).setup()


# --- JPEG decoder filler --------------------------------------------------------------------------------
def _jpeg_missing_scan(path: Path, keep: int | None) -> Path:
    _img(path, 3, size=128, fmt="JPEG")
    data = path.read_bytes()
    sos = data.find(b"\xff\xda")
    start = sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big")
    if keep is not None:
        path.write_bytes(data[:start + keep] + b"\xff\xd9")  # scan cut short, end marker kept
    return path


def test_a_jpeg_that_is_mostly_decoder_filler_is_an_error(tmp_path):
    ds = tmp_path / "ds"
    ds.mkdir()
    for stem, keep in (("intact", None), ("gutted", 40), ("half", None)):
        _jpeg_missing_scan(ds / f"{stem}.jpg", keep)
        (ds / f"{stem}.txt").write_text("a picture")
    # "half": find how much scan data leaves 20-40 % filler, to check the warning band too.
    full = (ds / "half.jpg").read_bytes()
    for keep in range(len(full) // 2, len(full), 40):
        _jpeg_missing_scan(ds / "half.jpg", keep)
        frac = _filler(ds / "half.jpg")
        if 0.1 <= frac < 0.5:
            break
    report = validate_dataset(ds)
    errors, warns = _problems(report), _problems(report, "warnings")
    assert "decoder filler" in errors["gutted.jpg"]
    assert "intact.jpg" not in errors and "intact.jpg" not in warns
    assert "half.jpg" not in errors and "flat grey" in warns["half.jpg"]


def _filler(path: Path) -> float:
    from fluxlab.datacheck import _jpeg_filler_fraction

    with Image.open(path) as im:
        im.load()
        return _jpeg_filler_fraction(im)


def test_a_flat_grey_png_is_not_mistaken_for_jpeg_filler(tmp_path):
    ds = tmp_path / "ds"
    ds.mkdir()
    Image.new("RGB", (64, 64), (128, 128, 128)).save(ds / "grey.png")
    (ds / "grey.txt").write_text("a grey square")
    assert validate_dataset(ds).ok


# --- names in the report -------------------------------------------------------------------------------
def test_hostile_file_names_are_escaped_in_the_text_report_and_raw_in_json(tmp_path, capsys):
    ds = tmp_path / "ds"
    ds.mkdir()
    forged = "x.png  corrupt image\nerror    y.png"
    ansi = "\x1b[2J\x1b[31mred.png"
    for name in (forged, ansi):
        (ds / name).write_bytes(b"not an image")
    assert main(["data", "validate", str(ds)]) == 1
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\\x1b[2J" in out and "\\n" in out
    rows = [line for line in out.splitlines() if line.startswith("error ")]
    assert main(["data", "validate", str(ds), "--json"]) == 1
    errors = json.loads(capsys.readouterr().out)["errors"]
    assert len(rows) == len(errors) == 4  # unreadable + no caption, per file: no forged row
    assert {e["file"] for e in errors} == {forged, ansi}  # --json keeps the raw names


# --- caches ------------------------------------------------------------------------------------------------
def _entry_like_dir(cache_dir: Path, kind="latent") -> Path:
    d = cache_dir / kind / "ab" / ("ab" + "0" * 62 + caches.ENTRY_SUFFIX)
    d.mkdir(parents=True)
    (d / "inside.txt").write_text("not fluxlab's")
    return d


def test_cache_verify_reports_and_evicts_a_wrong_kind_entry_without_deleting_it(tmp_path, capsys):
    d = _entry_like_dir(tmp_path)
    fifo = tmp_path / "text" / "cd" / ("cd" + "1" * 62 + caches.ENTRY_SUFFIX)
    fifo.parent.mkdir(parents=True)
    os.mkfifo(fifo)  # reading it would block forever
    assert main(["cache", "verify", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "is a folder" in out and "not a regular file" in out and "2 corrupt, 2 evicted" in out
    assert not d.exists() and not fifo.exists()
    (moved,) = [p for p in (tmp_path / "evicted").iterdir() if p.is_dir()]
    assert (moved / "inside.txt").read_text() == "not fluxlab's"  # moved whole, not deleted


def test_training_evicts_a_corrupt_and_a_wrong_kind_entry_and_says_so(pipe, shapes, tmp_path, capsys):
    from fluxlab.config import load_config
    from fluxlab.trainer import Trainer

    cache = tmp_path / "cache"
    cfg = load_config(ROOT / "configs" / "tiny.yaml", {
        "data": str(shapes), "output_dir": str(tmp_path / "o"), "cache_dir": str(cache), "num_workers": "0",
        "progress": "false", "max_sequence_length": "16", "device": "cpu", "steps": "1"})
    Trainer(cfg, pipe=copy.deepcopy(pipe)).setup()
    latent = sorted((cache / "latent").glob("*/*" + caches.ENTRY_SUFFIX))
    data = bytearray(latent[0].read_bytes())
    data[-5] ^= 0xFF
    latent[0].write_bytes(bytes(data))
    text = sorted((cache / "text").glob("*/*" + caches.ENTRY_SUFFIX))[0]
    text.unlink()
    text.mkdir()
    capsys.readouterr()
    Trainer(cfg, pipe=copy.deepcopy(pipe)).setup()
    err = capsys.readouterr().err
    assert "evicted 2 corrupt cache entries and recomputed them" in err
    assert str(latent[0]) in err and str(text) in err and "is a folder" in err
    caches.read_entry(latent[0])
    caches.read_entry(text)  # both recomputed and whole again


# --- the results store ---------------------------------------------------------------------------------------
@pytest.fixture
def db(tmp_path):
    path = tmp_path / "results.db"
    for i in range(3):
        store.record(f"bench{i}", store=path, display=False, metrics={"pad": "y" * 3000})
    return path


def _truncate(path: Path, n: int) -> None:
    path.write_bytes(path.read_bytes()[:-n])


@pytest.mark.parametrize("damage,words", [
    (lambda p: p.write_bytes(b""), "0 bytes"),
    (lambda p: _truncate(p, 1), "truncated"),
    (lambda p: _truncate(p, 4096), "quick_check"),
    (lambda p: p.write_bytes(b"SQLite format 3\x00" + b"\xff" * 200), "pages"),
], ids=["zero-bytes", "minus-1-byte", "minus-1-page", "bad-header"])
def test_any_store_corruption_is_a_store_error_naming_the_file_and_nothing_is_written(db, capsys, damage, words):
    damage(db)
    before = db.read_bytes()
    with pytest.raises(store.StoreError) as e:
        store.query(db)
    assert str(db) in str(e.value) and "Move it aside" in str(e.value)
    with pytest.raises(store.StoreError):
        store.record("more", store=db, display=False)
    assert db.read_bytes() == before  # nothing written into a damaged store
    assert main(["results", "--store", str(db), "list"]) == 2
    err = capsys.readouterr().err
    assert str(db) in err and "Traceback" not in err


def test_a_damaged_row_is_a_store_error_naming_the_file(db):
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE records SET body = substr(body, 1, 50)")
    with pytest.raises(store.StoreError, match=str(db)):
        store.query(db)


def test_a_new_store_is_never_a_zero_byte_file(tmp_path):
    path = tmp_path / "fresh.db"
    store.record("first", store=path, display=False)
    assert path.stat().st_size > 0 and len(store.query(path)) == 1
    assert not list(tmp_path.glob(".*.tmp*"))
