"""Datasets: the sample and shapes datasets, aspect buckets, the training dataset and the bucket
sampler. Validation lives in fluxlab/datacheck.py (its public names are re-exported here).

A dataset is a folder of images with same-stem captions beside them (`cat.png` <-> `cat.txt`,
the kohya / ai-toolkit / SimpleTuner convention). An optional `metadata.jsonl` (Hugging Face
imagefolder style: {"file_name": ..., "text": ...} per line) supplies captions for images that
have no `.txt`. Sub-folders are read too; names starting with "." are skipped.

    report = validate_dataset("data/shapes")        # never raises on a bad file
    ds = ImageCaptionDataset("data/shapes", resolution=64)
    sampler = BucketBatchSampler(ds.buckets, batch_size=4, seed=0)
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

from fluxlab._atomic import atomic_write_bytes
from fluxlab.datacheck import (ALLOWED_FORMATS, CAPTION_EXT, DEFAULT_MAX_PIXELS, IMAGE_EXTS,  # noqa: F401
                               MAX_CAPTION_BYTES, METADATA_FILE, MIN_SIDE, DatasetError, DatasetReport, Issue,
                               _pillow_limits, _scan, to_rgb, validate_dataset)
from fluxlab.errors import printable

__all__ = ["Issue", "DatasetReport", "DatasetError", "validate_dataset", "make_sample_dataset", "make_shapes_dataset",
           "ImageCaptionDataset", "aspect_buckets", "nearest_bucket", "BucketBatchSampler", "to_rgb"]


# --- the sample dataset (photos that ship with scikit-image) -----------------------------------------
def _captions_json() -> Path:
    return Path(__file__).resolve().parent.parent / "data" / "sample" / "captions.json"


def make_sample_dataset(dir: str | os.PathLike, *, min_images: int = 12) -> Path:
    """Copy the captioned scikit-image photos into `dir` (bytes unchanged) with `<stem>.txt` captions."""
    import skimage.data

    src_dir = Path(skimage.data.__file__).parent
    cj = _captions_json()
    if not cj.exists():
        raise FileNotFoundError(f"{cj} not found: `fluxlab data sample` needs a source checkout of fluxlab")
    captions: dict[str, str] = json.loads(cj.read_text(encoding="utf-8"))
    out = Path(dir)
    copied = 0
    for stem, caption in sorted(captions.items()):
        found = [src_dir / f"{stem}{ext}" for ext in (".png", ".jpg") if (src_dir / f"{stem}{ext}").exists()]
        if not found:
            continue        # older scikit-image versions download some images on demand; skip those
        atomic_write_bytes(out / found[0].name, found[0].read_bytes())
        atomic_write_bytes(out / f"{stem}{CAPTION_EXT}", (caption.strip() + "\n").encode("utf-8"))
        copied += 1
    if copied < min_images:
        raise FileNotFoundError(f"only {copied} of the captioned images exist in {src_dir} (need {min_images}); "
                           "upgrade scikit-image")
    return out


# --- the synthetic shapes dataset ---------------------------------------------------------------
SHAPE_COLOURS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (30, 80, 220),
                 "yellow": (235, 200, 20), "purple": (140, 50, 180), "orange": (245, 130, 20)}
SHAPES = ("circle", "square", "triangle")
# 3x3 grid, row-major: (row, col) -> phrase used in the caption
POSITIONS = ("at the top left", "at the top", "at the top right",
             "on the left", "in the center", "on the right",
             "at the bottom left", "at the bottom", "at the bottom right")
SCALES = {"small": 0.5, "large": 0.9}     # shape diameter as a fraction of its grid cell


def _shape_attrs(seed: int, i: int) -> dict:
    """The attributes of image i, from a hash so they do not depend on n or on any RNG's version."""
    b = hashlib.sha256(f"fluxlab-shapes:{seed}:{i}".encode()).digest()
    colours = list(SHAPE_COLOURS)
    return {"colour": colours[b[0] % len(colours)], "shape": SHAPES[b[1] % len(SHAPES)],
            "position": b[2] % len(POSITIONS), "scale": list(SCALES)[b[3] % len(SCALES)]}


def _draw_shape(width: int, height: int, a: dict) -> Image.Image:
    im = Image.new("RGB", (width, height), (255, 255, 255))
    row, col = divmod(a["position"], 3)
    cw, ch = width / 3, height / 3
    cx, cy = (col + 0.5) * cw, (row + 0.5) * ch
    r = SCALES[a["scale"]] * min(cw, ch) / 2
    box = [round(cx - r), round(cy - r), round(cx + r), round(cy + r)]
    fill = SHAPE_COLOURS[a["colour"]]
    draw = ImageDraw.Draw(im)
    if a["shape"] == "circle":
        draw.ellipse(box, fill=fill)
    elif a["shape"] == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(box[0], box[3]), (box[2], box[3]), (round(cx), box[1])], fill=fill)
    return im


def make_shapes_dataset(dir: str | os.PathLike, n: int = 64, seed: int = 0, size: int = 64, *,
                        aspect_every: int = 0) -> Path:
    """Write n images `shape_00000.png`... with captions like "a large red circle at the top left on a
    white background", plus `attributes.jsonl` (the labels, for evaluation).

    Deterministic: the same (n, seed, size, aspect_every) gives byte-identical files. Image i does not
    depend on n. With `aspect_every=k > 0`, every k-th image is 2:3 portrait or 3:2 landscape
    (alternating), to exercise aspect buckets. Random flips would make "left"/"right" captions wrong.
    """
    if n < 1:
        raise DatasetError(f"n must be at least 1, got {n}")
    if size < MIN_SIDE:
        raise DatasetError(f"size must be at least {MIN_SIDE} (validate rejects smaller images), got {size}")
    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    long_side = max(16, round(size * 1.5 / 16) * 16)
    names, attrs_lines = set(), []
    for i in range(n):
        a = _shape_attrs(seed, i)
        w = h = size
        if aspect_every > 0 and i % aspect_every == aspect_every - 1:
            portrait = (i // aspect_every) % 2 == 0
            w, h = (size, long_side) if portrait else (long_side, size)
        caption = f"a {a['scale']} {a['colour']} {a['shape']} {POSITIONS[a['position']]} on a white background"
        buf = io.BytesIO()
        _draw_shape(w, h, a).save(buf, format="PNG", optimize=False)
        stem = f"shape_{i:05d}"
        atomic_write_bytes(out / f"{stem}.png", buf.getvalue())
        atomic_write_bytes(out / f"{stem}{CAPTION_EXT}", (caption + "\n").encode("utf-8"))
        names.update({f"{stem}.png", f"{stem}{CAPTION_EXT}"})
        attrs_lines.append(json.dumps({"file_name": f"{stem}.png", "caption": caption, "width": w, "height": h,
                                       **a, "position": POSITIONS[a["position"]]}))
    atomic_write_bytes(out / "attributes.jsonl", ("\n".join(attrs_lines) + "\n").encode("utf-8"))
    # A previous, larger build leaves extra shape files behind; they would silently join the dataset.
    for p in out.glob("shape_*"):
        if p.name not in names and p.suffix in (".png", CAPTION_EXT):
            p.unlink()
    return out


# --- aspect buckets -----------------------------------------------------------------------------
def aspect_buckets(resolution: int, step: int = 64, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(H, W) buckets with about resolution**2 pixels (never more), sides multiples of `step`.

    `step` must be a multiple of 16: the VAE downsamples 8x and FLUX packs 2x2 latent patches.
    """
    if step <= 0 or step % 16:
        raise ValueError(f"bucket step must be a positive multiple of 16 (8x VAE, 2x2 packing), got {step}")
    if resolution < step:
        raise DatasetError(f"resolution {resolution} is smaller than the bucket step {step}")
    if max_ratio < 1:
        raise ValueError(f"max_ratio must be >= 1, got {max_ratio}")
    target = resolution * resolution
    out = set()
    h = step
    while h <= resolution * max_ratio:
        w = (target // h) // step * step         # floor: a bucket never costs more memory than the square
        if w >= step and max(h / w, w / h) <= max_ratio + 1e-9:
            out.add((h, w))
        h += step
    if not out:
        raise ValueError(f"no bucket fits resolution={resolution}, step={step}, max_ratio={max_ratio}")
    return sorted(out)


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The (H, W) bucket whose aspect ratio is closest to the image's (log scale; ties: larger area)."""
    if not buckets:
        raise ValueError("no buckets given")
    ar = math.log(height / width)
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - ar), 12), -b[0] * b[1], b))


# --- the dataset --------------------------------------------------------------------------------
class ImageCaptionDataset:
    """Validated image/caption pairs as [-1, 1] tensors, each resized and cropped to its aspect bucket.

    Construction validates the folder and refuses it when there are errors. Random crops and flips
    are drawn from (seed, epoch, index), so a resumed run sees the same pixels; call `set_epoch`.
    """

    def __init__(self, root: str | os.PathLike, resolution: int = 64, center_crop: bool = True,
                 random_flip: bool = False, bucket_step: int = 64, *, max_ratio: float = 2.0, seed: int = 0,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.root = Path(root)
        self.report, good = _scan(self.root, max_pixels, MIN_SIDE)
        if not self.report.ok:
            errs = self.report.errors
            listing = "\n".join(f"  {printable(e.file)}: {printable(e.problem)}" for e in errs[:10])
            more = f"\n  ... and {len(errs) - 10} more" if len(errs) > 10 else ""
            raise DatasetError(f"dataset {self.root} has {len(errs)} error(s), first {printable(errs[0].file)}: "
                               f"{printable(errs[0].problem)}\n{listing}{more}\n"
                             f"fix or remove these files (see `fluxlab data validate {self.root}`)")
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.seed, self.epoch, self.max_pixels = seed, 0, max_pixels
        self.bucket_list = aspect_buckets(resolution, bucket_step, max_ratio)
        self.records: list[tuple[Path, str]] = [(self.root / g.rel, g.caption) for g in good]
        self.buckets: list[tuple[int, int]] = [nearest_bucket(g.width, g.height, self.bucket_list) for g in good]

    def __len__(self) -> int:
        return len(self.records)

    def bucket_of(self, i: int) -> tuple[int, int]:
        return self.buckets[i]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, i: int) -> dict:
        path, caption = self.records[i]
        bh, bw = self.buckets[i]
        data = path.read_bytes()
        with _pillow_limits(self.max_pixels):
            im = to_rgb(Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS))   # in memory: nothing to close
        # Scale so the image covers the bucket, then crop the overflow on the long side.
        w, h = im.size
        s = max(bw / w, bh / h)
        nw, nh = max(bw, round(w * s)), max(bh, round(h * s))
        im = im.resize((nw, nh), Image.Resampling.LANCZOS)
        rng = random.Random(f"{self.seed}:{self.epoch}:{i}")
        if self.center_crop:
            left, top = (nw - bw) // 2, (nh - bh) // 2
        else:
            left, top = rng.randint(0, nw - bw), rng.randint(0, nh - bh)
        im = im.crop((left, top, left + bw, top + bh))
        if self.random_flip and rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        import torch  # lazy: validation and the CLI must not pay ~2 s for importing torch

        pixels = torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1)   # [3, H, W] uint8
        pixels = pixels.float().div_(127.5).sub_(1.0)                              # [-1, 1]
        return {"index": i, "pixels": pixels, "caption": caption, "bucket": (bh, bw),
                "image_sha256": hashlib.sha256(data).hexdigest(), "image_path": str(path)}


# --- the bucket batch sampler ----------------------------------------------------------------------
class BucketBatchSampler:
    """Batches of indices that share one bucket; order fixed by (seed, epoch); sharded over ranks.

    Use it as a DataLoader `batch_sampler`. It implements torch's Sampler protocol (`__iter__`,
    `__len__`) without subclassing it, so `fluxlab data validate` does not pay to import torch. Call `set_epoch(e)` before each epoch, as with
    DistributedSampler. Each `__iter__` yields the rest of the current epoch from the cursor.

    Resuming: `state_dict()` records (epoch, cursor). A DataLoader with workers pulls batches ahead
    of the training loop, so pass the number of batches the loop really consumed in this epoch:
    `state_dict(consumed=k)`. Every rank gets the same number of batches (DDP would hang otherwise).
    """

    def __init__(self, buckets_per_index: list[tuple[int, int]], batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, drop_last: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.buckets = [tuple(b) for b in buckets_per_index]
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.drop_last = drop_last
        self.epoch, self._cursor = 0, 0
        if len(self) == 0:
            sizes = Counter(self.buckets)
            raise DatasetError(f"no full batch of {batch_size} for {world_size} rank(s): bucket sizes {dict(sizes)}; "
                             "lower batch_size or set drop_last=False")

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches for `epoch`."""
        rng = random.Random(f"bucket-sampler:{self.seed}:{epoch}")
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, b in enumerate(self.buckets):
            groups[b].append(i)
        batches: list[list[int]] = []
        for b in sorted(groups):
            idx = groups[b]
            rng.shuffle(idx)
            for k in range(0, len(idx), self.batch_size):
                chunk = idx[k:k + self.batch_size]
                if len(chunk) == self.batch_size or not self.drop_last:
                    batches.append(chunk)
        rng.shuffle(batches)
        if self.drop_last:
            batches = batches[:len(batches) - len(batches) % self.world_size]
        elif batches and len(batches) % self.world_size:
            batches += batches[:self.world_size - len(batches) % self.world_size]  # pad, as DistributedSampler
        return batches[self.rank::self.world_size]

    def __len__(self) -> int:
        return len(self._epoch_batches(self.epoch))

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._epoch_batches(self.epoch)
        for k in range(self._cursor, len(batches)):
            self._cursor = k + 1
            yield batches[k]
        self._cursor = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:   # same epoch again (e.g. right after load_state_dict) keeps the cursor
            self.epoch, self._cursor = epoch, 0

    def _fingerprint(self) -> dict:
        return {"seed": self.seed, "batch_size": self.batch_size, "world_size": self.world_size,
                "drop_last": self.drop_last, "n": len(self.buckets)}

    def state_dict(self, consumed: int | None = None) -> dict:
        cursor = self._cursor if consumed is None else consumed
        return {"epoch": self.epoch, "cursor": cursor, **self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in self._fingerprint().items():
            if key in state and state[key] != mine:
                raise ValueError(f"sampler state was saved with {key}={state[key]!r} but this sampler has "
                                 f"{key}={mine!r}; resume with the same {key} or start a new run")
        self.epoch, self._cursor = int(state["epoch"]), int(state["cursor"])
