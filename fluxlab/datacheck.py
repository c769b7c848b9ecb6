"""Dataset validation: every image and caption of a dataset folder checked before training, with
one report of errors (unusable files) and warnings (usable, but worth knowing).

A dataset is a folder of images with same-stem captions beside them (`cat.png` <-> `cat.txt`,
the kohya / ai-toolkit / SimpleTuner convention). An optional `metadata.jsonl` (Hugging Face
imagefolder style: {"file_name": ..., "text": ...} per line) supplies captions for images that
have no `.txt`. Sub-folders are read too; names starting with "." are skipped.

    report = validate_dataset("data/shapes")        # never raises on a bad file
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import statistics
import warnings
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

from fluxlab.errors import UserError, UserFileNotFound, printable

# Extension -> the Pillow formats we let decode it. Restricting formats stops Pillow from
# "recognising" garbage as a format with weak magic bytes (TGA, ICO...), so random bytes named
# .png are reported as unreadable instead of decoding as noise.
IMAGE_EXTS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP",
              ".gif": "GIF", ".tif": "TIFF", ".tiff": "TIFF"}
ALLOWED_FORMATS = sorted(set(IMAGE_EXTS.values()))
CAPTION_EXT = ".txt"
METADATA_FILE = "metadata.jsonl"
MIN_SIDE = 64                      # smallest useful side: one 2x2 packed latent patch is 16 px
DEFAULT_MAX_PIXELS = 100_000_000   # 100 MP; larger files are treated as decompression bombs
_ALPHA_MODES = {"RGBA", "LA", "PA", "La", "RGBa"}
_PNG_IEND = b"IEND\xaeB`\x82"      # IEND has no data, so its CRC is a constant
# A caption longer than this is not a caption (T5 reads 512 tokens, about 3 KB of English); a
# larger file is refused unread, so a 50 MB "caption" never reaches the text encoders.
MAX_CAPTION_BYTES = 64 * 1024
# libjpeg fills the blocks of missing scan data with zero coefficients: mid-grey (128, 128, 128).
# An image whose raster-order tail is this filler lost its data there.
JPEG_FILLER = 128
FILLER_ERROR, FILLER_WARN = 0.5, 0.1   # fraction of the pixels
_ALLOWED_CONTROLS = {"\t", "\n", "\r"}


class DatasetError(UserError, ValueError):
    """A dataset that cannot be used as is; the message names the files and what to do."""

__all__ = ["Issue", "DatasetReport", "DatasetError", "validate_dataset", "to_rgb"]


# --- small helpers ------------------------------------------------------------------------------


@contextlib.contextmanager
def _pillow_limits(max_pixels: int):
    """Make Pillow refuse images over `max_pixels` and truncated files, for this block only.

    Pillow warns above MAX_IMAGE_PIXELS and raises above twice that; turning the warning into an
    error makes `max_pixels` the one limit. LOAD_TRUNCATED_IMAGES is forced off because a user
    may have switched it on globally, which would hide truncation. Other decoder warnings
    ("Corrupt EXIF data"...) are collected in the yielded list instead of going to stderr.
    """
    old_max, old_trunc = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = max_pixels, False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield caught
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = old_max, old_trunc


def _is_hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


# --- conversion to RGB (validate warns with the same words this applies) ---------------------------
def _rgb_plan(im: Image.Image) -> tuple[str, str | None]:
    """How `to_rgb` converts `im`: (method, warning text or None when the conversion is lossless)."""
    mode = im.mode
    if mode.startswith("I") or mode == "F":
        return "rescale", f"high bit depth (mode {mode}): will be rescaled to 8 bits (value/257) and copied to 3 RGB channels"
    if mode in _ALPHA_MODES or "transparency" in im.info:
        kind = "palette image" if mode == "P" else f"mode {mode}"
        return "composite", f"{kind} with alpha/transparency: will be composited onto white, then converted to RGB"
    if mode in ("RGB", "L", "1"):
        return "convert", None
    if mode == "P":
        return "convert", "palette image (mode P): the palette will be expanded to RGB"
    if mode == "CMYK":
        return "convert", "CMYK image: will be converted to RGB without colour management (colours may shift)"
    return "convert", f"mode {mode}: will be converted to RGB"


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow image to 8-bit RGB, the conversion `validate_dataset` warns about."""
    method, _ = _rgb_plan(im)
    if method == "rescale":
        # Pillow's convert("RGB") clips 16-bit values at 255 instead of scaling them.
        a = np.asarray(im, dtype=np.float64)
        scale = 1.0 / 257.0 if a.size and a.max() > 255 else 1.0
        a = np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(a).convert("RGB")
    if method == "composite":
        # Plain convert("RGB") would expose whatever colour hides under transparent pixels.
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


# --- validation -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Issue:
    """One problem with one file. `file` is relative to the dataset root (posix separators)."""

    file: str
    problem: str
    hint: str


@dataclass
class DatasetReport:
    """What `validate_dataset` found. `ok` is True when there are no errors (warnings allowed)."""

    root: str
    errors: list[Issue] = field(default_factory=list)
    warnings: list[Issue] = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        return {"root": self.root, "ok": self.ok, "errors": [asdict(i) for i in self.errors],
                "warnings": [asdict(i) for i in self.warnings], "stats": self.stats}

    def format(self) -> str:
        """A human summary: statistics, then one row per issue (errors first)."""
        s = self.stats
        verdict = "OK" if self.ok else "FAILED"
        lines = [f"dataset {printable(self.root)}: {verdict} ({len(self.errors)} errors, {len(self.warnings)} warnings)",
                 f"  images {s.get('n_images', 0)}   captions {s.get('n_captions', 0)}   pairs {s.get('n_pairs', 0)}"]
        if s.get("width_min") is not None:
            lines.append(f"  width {s['width_min']}..{s['width_max']} px   height {s['height_min']}..{s['height_max']} px")
        if s.get("caption_words_min") is not None:
            lines.append(f"  caption words min {s['caption_words_min']}  median {s['caption_words_median']:g}"
                         f"  max {s['caption_words_max']}")
        if s.get("modes"):
            lines.append("  modes " + ", ".join(f"{m} {n}" for m, n in sorted(s["modes"].items())))
        dups = s.get("duplicates") or []
        lines.append(f"  duplicate groups {len(dups)}")
        # Names are escaped: a file called "a\nerror  x.png" must not forge a row (--json keeps them raw).
        rows = [(sev, Issue(printable(i.file), printable(i.problem), printable(i.hint)))
                for sev, group in (("error", self.errors), ("warning", self.warnings)) for i in group]
        if rows:
            wf = max(4, *(len(i.file) for _, i in rows))
            wp = max(7, *(len(i.problem) for _, i in rows))
            lines += ["", f"{'severity':<8}  {'file':<{wf}}  {'problem':<{wp}}  hint"]
            lines += [f"{sev:<8}  {i.file:<{wf}}  {i.problem:<{wp}}  {i.hint}" for sev, i in rows]
        return "\n".join(lines)


@dataclass
class _Image:
    """A readable image found by the scan (internal: the dataset builds its records from these)."""

    rel: str
    width: int
    height: int
    mode: str
    caption: str | None = None


def _inspect_image(path: Path, rel: str, max_pixels: int, min_side: int,
                   err: list[Issue], warn: list[Issue]) -> tuple[_Image | None, str | None]:
    """Decode one image fully. Returns (info or None if unusable, sha256 of the bytes or None)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        err.append(Issue(rel, f"cannot read file ({e.strerror or e})", "check permissions, or delete the file"))
        return None, None
    if not data:
        err.append(Issue(rel, "zero-byte image file", "re-copy or re-export the image, or delete it"))
        return None, None
    digest = hashlib.sha256(data).hexdigest()
    try:
        with _pillow_limits(max_pixels) as caught:
            with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as im:
                im.verify()                 # structure and checksums; the image is unusable afterwards
            with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as im:
                im.load()                   # decode every pixel: catches truncated pixel data
                fmt, mode, (w, h) = im.format, im.mode, im.size
                _, note = _rgb_plan(im)
                filler = _jpeg_filler_fraction(im) if fmt == "JPEG" else 0.0
                bit_depth = data[24] if fmt == "PNG" and len(data) > 24 else 8
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        err.append(Issue(rel, f"decompression bomb: more than {max_pixels:,} pixels ({e})",
                         "downscale the image, or raise max_pixels if it is genuinely this large"))
        return None, digest
    except Image.UnidentifiedImageError:
        err.append(Issue(rel, f"unreadable: not a valid {'/'.join(ALLOWED_FORMATS)} image",
                         "re-export it as PNG or JPEG, or delete it"))
        return None, digest
    except Exception as e:  # noqa: BLE001 - any decoder failure is a per-file error, never a crash
        problem = "truncated or corrupt image data" if _looks_truncated(e) else "corrupt image"
        err.append(Issue(rel, f"{problem} ({type(e).__name__}: {e})", "re-copy or re-export the image, or delete it"))
        return None, digest
    if fmt == "PNG" and _PNG_IEND not in data[-4096:]:
        # Pillow decodes PNGs that stop inside the final IEND chunk; the file is still cut short.
        err.append(Issue(rel, "truncated PNG (no complete IEND chunk at the end)", "re-copy or re-export the image"))
        return None, digest
    if filler >= FILLER_ERROR:
        err.append(Issue(rel, f"JPEG data missing: the last {filler:.0%} of the pixels are decoder filler "
                              f"(flat grey {JPEG_FILLER})", "re-copy or re-export the image; if it really is "
                              "grey there, re-save it as PNG"))
        return None, digest
    if filler >= FILLER_WARN:
        warn.append(Issue(rel, f"the last {filler:.0%} of the pixels are flat grey {JPEG_FILLER}, as a JPEG decoder "
                               f"fills missing data", "check the image; re-copy it if its bottom is grey by accident"))
    if min(w, h) < min_side:
        err.append(Issue(rel, f"too small: {w}x{h} px, under {min_side} px on the short side",
                         f"use images of at least {min_side} px, or delete it"))
        return None, digest
    for msg in dict.fromkeys(str(c.message).strip() for c in caught):   # dedupe, keep order
        warn.append(Issue(rel, f"decoder warning: {msg}", "the pixels decoded; re-save the image to clean it"))
    if note:
        warn.append(Issue(rel, note, "no action needed; re-save as 8-bit RGB to silence this"))
    if fmt == "PNG" and bit_depth == 16 and not note:
        warn.append(Issue(rel, "16-bit PNG: will be read at 8 bits per channel",
                          "no action needed; re-save as 8-bit to silence this"))
    expected = IMAGE_EXTS[path.suffix.lower()]
    if fmt != expected:
        warn.append(Issue(rel, f"extension says {expected} but the content is {fmt}",
                          "rename it to match its content (it is still read correctly)"))
    return _Image(rel, w, h, mode), digest


def _jpeg_filler_fraction(im: Image.Image) -> float:
    """Fraction of the pixels, counted back from the last one in raster order, that are exactly the
    mid-grey a JPEG decoder writes where scan data is missing (0 for other modes)."""
    if im.mode not in ("L", "RGB"):
        return 0.0
    a = np.asarray(im)
    flat = (a == JPEG_FILLER) if a.ndim == 2 else (a == JPEG_FILLER).all(axis=-1)    # [H, W]
    flat = flat.reshape(-1)
    real = np.flatnonzero(~flat)
    tail = flat.size - (int(real[-1]) + 1 if real.size else 0)
    return tail / flat.size


def _looks_truncated(e: Exception) -> bool:
    text = str(e).lower()
    return isinstance(e, EOFError) or "truncat" in text or "broken" in text or "incomplete" in text


def _read_caption(path: Path, rel: str, err: list[Issue], warn: list[Issue] | None = None) -> str | None:
    """A caption's text, or None after recording why it cannot be used."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CAPTION_BYTES + 1)   # bounded: never read a huge file whole
    except OSError as e:
        err.append(Issue(rel, f"cannot read caption ({e.strerror or e})", "check permissions"))
        return None
    if len(raw) > MAX_CAPTION_BYTES:
        err.append(Issue(rel, f"caption larger than {MAX_CAPTION_BYTES // 1024} KiB (not a caption?)",
                         "write a caption of a few sentences; the text encoder reads at most 512 tokens"))
        return None
    try:
        text = raw.decode("utf-8-sig").strip()   # -sig: tolerate a BOM written by Windows editors
    except UnicodeDecodeError as e:
        err.append(Issue(rel, f"caption is not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})",
                         "re-save the caption as UTF-8"))
        return None
    if not text:
        err.append(Issue(rel, "empty caption", "write a caption describing the image, or delete the pair"))
        return None
    return _check_caption_text(text, rel, err, warn)


def _check_caption_text(text: str, rel: str, err: list[Issue], warn: list[Issue] | None) -> str | None:
    """Refuse NUL bytes and captions with no printable text; warn about other control characters."""
    if "\0" in text:
        err.append(Issue(rel, "caption contains NUL bytes (a binary file?)", "re-save the caption as plain text"))
        return None
    if not any(c.isprintable() and not c.isspace() for c in text):
        err.append(Issue(rel, "caption has no printable text (only control characters)",
                         "write a caption describing the image"))
        return None
    controls = sorted({c for c in text if not c.isprintable() and c not in _ALLOWED_CONTROLS})
    if controls and warn is not None:
        warn.append(Issue(rel, "caption contains control characters " + ", ".join(printable(c) for c in controls[:5]),
                          "remove them; the text encoder reads them as text"))
    return text


def _read_metadata(path: Path, rel: str, err: list[Issue]) -> dict[str, str]:
    """metadata.jsonl -> {image path relative to its folder: caption}; bad lines become errors."""
    out: dict[str, str] = {}
    try:
        lines = path.read_bytes().decode("utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        err.append(Issue(rel, f"cannot read metadata ({e})", "re-save it as UTF-8 JSON lines"))
        return out
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            name, text = obj["file_name"], obj.get("text", obj.get("caption"))
            if not isinstance(name, str) or not isinstance(text, str):
                raise TypeError("file_name and text must be strings")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            err.append(Issue(f"{rel}:{n}", f"bad metadata line ({type(e).__name__}: {e})",
                             'each line must be {"file_name": "img.png", "text": "a caption"}'))
            continue
        if len(text.encode("utf-8", "replace")) > MAX_CAPTION_BYTES:
            err.append(Issue(f"{rel}:{n}", f"caption larger than {MAX_CAPTION_BYTES // 1024} KiB",
                             "write a caption of a few sentences"))
            continue
        out[Path(name).as_posix()] = text.strip()
    return out


def _scan(root: str | os.PathLike, max_pixels: int, min_side: int) -> tuple[DatasetReport, list[_Image]]:
    """Validate `root`; also return the usable (image, caption) pairs, sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise UserFileNotFound(f"dataset folder {root} does not exist (or is not a folder); make the synthetic "
                               f"shapes set there with: fluxlab data shapes {root} --n 64 --seed 0")
    real_root = root.resolve()
    err: list[Issue] = []
    warn: list[Issue] = []
    images: list[Path] = []
    captions: dict[tuple[Path, str], Path] = {}      # (folder, stem) -> caption file
    meta_caps: dict[Path, str] = {}                   # image path -> caption from a metadata.jsonl
    n_ignored = 0
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if _is_hidden(rel) or not (p.is_file() or p.is_symlink()):
            continue
        target = p.resolve()
        if not target.is_relative_to(real_root):
            # A link out of the dataset (e.g. a caption -> /etc/passwd): never read it.
            err.append(Issue(rel.as_posix(), f"resolves outside the dataset folder (to {target})",
                             "copy the file into the dataset instead of linking to it, or remove the link"))
            continue
        if not p.is_file():
            continue  # a link to a folder inside the dataset (not descended) or a dangling link
        ext = p.suffix.lower()
        if ext in IMAGE_EXTS:
            images.append(p)
        elif ext == CAPTION_EXT:
            captions[(p.parent, p.stem)] = p
        elif p.name == METADATA_FILE:
            # keyed by path so file_name may point into sub-folders, as in HF imagefolder
            for name, text in _read_metadata(p, rel.as_posix(), err).items():
                meta_caps[Path(os.path.normpath(p.parent / name))] = text
        else:
            n_ignored += 1

    good: list[_Image] = []
    by_hash: dict[str, list[str]] = defaultdict(list)
    used_captions: set[Path] = set()
    stems = Counter((p.parent, p.stem) for p in images)
    modes: Counter = Counter()
    for p in images:
        rel = p.relative_to(root).as_posix()
        info, digest = _inspect_image(p, rel, max_pixels, min_side, err, warn)
        if digest is not None:
            by_hash[digest].append(rel)
        cap_path = captions.get((p.parent, p.stem))
        meta_text = meta_caps.get(p)
        if cap_path is not None:
            used_captions.add(cap_path)
            caption = _read_caption(cap_path, cap_path.relative_to(root).as_posix(), err, warn)
            if stems[(p.parent, p.stem)] > 1:
                warn.append(Issue(rel, f"shares its caption {cap_path.name} with another image of the same stem",
                                  "give each image its own stem if the captions should differ"))
        elif meta_text is not None:
            caption = meta_text or None
            if caption is None:
                err.append(Issue(rel, f"empty caption in {METADATA_FILE}", "write a caption for it"))
            else:
                caption = _check_caption_text(caption, f"{rel} ({METADATA_FILE})", err, warn)
        else:
            caption = None
            err.append(Issue(rel, f"no caption: expected {p.stem}{CAPTION_EXT} beside it",
                             f"write {p.stem}{CAPTION_EXT} (or add it to {METADATA_FILE}), or delete the image"))
        if info is not None:
            modes[info.mode] += 1
            if caption is not None:
                info.caption = caption
                good.append(info)

    for (folder, stem), cap in sorted(captions.items()):
        if cap not in used_captions:
            warn.append(Issue(cap.relative_to(root).as_posix(), "caption has no image (it will be ignored)",
                              f"add the image {stem}.png/.jpg beside it, or delete the caption"))
    for missing in sorted(set(meta_caps) - set(images)):
        rel = os.path.relpath(missing, root).replace(os.sep, "/")
        warn.append(Issue(rel, f"listed in {METADATA_FILE} but the image is missing (entry ignored)",
                          "add the image, or remove the line"))
    duplicates = [sorted(g) for g in by_hash.values() if len(g) > 1]
    for g in duplicates:
        warn.append(Issue(g[0], "duplicate content: same bytes as " + ", ".join(g[1:]),
                          "delete the copies unless the repetition is intended"))
    if not images:
        err.append(Issue(".", "no images found", f"put {', '.join(sorted(IMAGE_EXTS))} files with captions here"))

    words = [len(i.caption.split()) for i in good]
    stats = {
        "n_images": len(images),
        "n_captions": len(captions) + len(meta_caps),
        "n_pairs": len(good),
        "n_ignored_files": n_ignored,
        "width_min": min((i.width for i in good), default=None),
        "width_max": max((i.width for i in good), default=None),
        "height_min": min((i.height for i in good), default=None),
        "height_max": max((i.height for i in good), default=None),
        "caption_words_min": min(words, default=None),
        "caption_words_median": statistics.median(words) if words else None,
        "caption_words_max": max(words, default=None),
        "modes": dict(modes),
        "duplicates": duplicates,
    }
    return DatasetReport(str(root), err, warn, stats), good


def validate_dataset(root: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                     min_side: int = MIN_SIDE) -> DatasetReport:
    """Check image/caption pairing and every image; never raises on a bad file.

    Errors (the dataset cannot be used as is): unreadable, zero-byte, truncated or corrupt images,
    JPEGs that are mostly decoder filler (missing scan data), decompression bombs (over
    `max_pixels`), images under `min_side` px, missing / empty / non-UTF-8 captions, captions over
    MAX_CAPTION_BYTES, with NUL bytes or no printable text, files or links that resolve outside
    the dataset folder (never read), no images at all. Warnings: mode conversions (CMYK, 16-bit,
    palette, alpha), captions with no image or with control characters, a JPEG tail of decoder
    filler, duplicate files, extension/content mismatch. (The trainer also warns about captions
    longer than max_sequence_length tokens: that needs the tokenizer.)
    """
    return _scan(root, max_pixels, min_side)[0]
