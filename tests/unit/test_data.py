"""fluxlab.data: validation of every bad input, the sample/shapes datasets, buckets, the dataset, the sampler."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fluxlab import data
from fluxlab.cli import main


def _encode(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


_RNG = np.random.default_rng(0)


def _noise(size=(80, 72), mode="RGB") -> Image.Image:
    """A fresh random image (W, H): every call differs, so no two test files are duplicates by accident."""
    return Image.fromarray(_RNG.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)


def _pair(folder: Path, name: str, content: bytes, caption: bytes | None = b"a test image") -> None:
    """Write image `name` and (unless caption is None) its same-stem .txt."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(content)
    if caption is not None:
        (folder / name).with_suffix(".txt").write_bytes(caption)


# Each bad case: builds its files next to one good pair and says which file must be named, how.
def _zero_byte(d):
    _pair(d, "bad.png", b"")


def _truncated_png(d):
    png = _encode(_noise())
    _pair(d, "bad.png", png[: len(png) // 2])


def _truncated_jpeg(d):
    jpg = _encode(_noise(), "JPEG")
    _pair(d, "bad.jpg", jpg[: len(jpg) // 2])


def _random_bytes(d):
    _pair(d, "bad.png", np.random.default_rng(0).bytes(600))


def _png_cut_in_iend(d):
    png = _encode(_noise())
    _pair(d, "bad.png", png[:-2])   # Pillow itself decodes this one


def _cmyk(d):
    _pair(d, "bad.jpg", _encode(_noise(mode="CMYK"), "JPEG"))


def _sixteen_bit(d):
    a = (np.arange(80 * 72, dtype=np.uint16).reshape(72, 80) * 11)
    im = Image.fromarray(a)
    assert im.mode == "I;16"
    _pair(d, "bad.png", _encode(im))


def _palette(d):
    _pair(d, "bad.png", _encode(_noise().convert("P")))


def _rgba(d):
    _pair(d, "bad.png", _encode(_noise(mode="RGBA")))


def _tiny(d):
    _pair(d, "bad.png", _encode(_noise((32, 32))))


def _missing_caption(d):
    _pair(d, "bad.png", _encode(_noise()), caption=None)


def _empty_caption(d):
    _pair(d, "bad.png", _encode(_noise()), caption=b"  \n")


def _non_utf8_caption(d):
    _pair(d, "bad.png", _encode(_noise()), caption="un café noir".encode("latin-1"))


def _orphan_caption(d):
    (d / "lonely.txt").write_text("a caption without its image")


def _duplicate(d):
    (d / "copy.png").write_bytes((d / "good.png").read_bytes())
    (d / "copy.txt").write_text("the same picture again")


def _bad_metadata_line(d):
    _pair(d, "meta.png", _encode(_noise()), caption=None)
    (d / "metadata.jsonl").write_text('{"file_name": "meta.png", "text": "ok"}\n{not json\n')


CASES = {  # name: (builder, file named, severity, words in the problem)
    "zero-byte": (_zero_byte, "bad.png", "errors", "zero-byte"),
    "truncated-png": (_truncated_png, "bad.png", "errors", "truncated"),
    "truncated-jpeg": (_truncated_jpeg, "bad.jpg", "errors", "truncated"),
    "random-bytes": (_random_bytes, "bad.png", "errors", "unreadable"),
    "png-cut-in-iend": (_png_cut_in_iend, "bad.png", "errors", "truncated"),
    "cmyk": (_cmyk, "bad.jpg", "warnings", "CMYK"),
    "16-bit": (_sixteen_bit, "bad.png", "warnings", "rescaled to 8 bits"),
    "palette": (_palette, "bad.png", "warnings", "palette"),
    "alpha": (_rgba, "bad.png", "warnings", "composited onto white"),
    "under-64px": (_tiny, "bad.png", "errors", "too small"),
    "missing-caption": (_missing_caption, "bad.png", "errors", "no caption"),
    "empty-caption": (_empty_caption, "bad.txt", "errors", "empty caption"),
    "non-utf8-caption": (_non_utf8_caption, "bad.txt", "errors", "not UTF-8"),
    "orphan-caption": (_orphan_caption, "lonely.txt", "warnings", "no image"),
    "duplicate": (_duplicate, "copy.png", "warnings", "duplicate"),
    "bad-metadata-line": (_bad_metadata_line, "metadata.jsonl:2", "errors", "bad metadata line"),
}


def _build(d: Path, builder) -> Path:
    _pair(d, "good.png", _encode(_noise((96, 64))), b"a good image")
    builder(d)
    return d


@pytest.mark.parametrize("case", list(CASES))
def test_validate_names_each_bad_file(tmp_path, case):
    builder, file, severity, words = CASES[case]
    report = data.validate_dataset(_build(tmp_path / "ds", builder))
    issues = getattr(report, severity)
    named = [i for i in issues if i.file == file or file in i.problem]
    assert named, f"{case}: no {severity[:-1]} for {file}: {report.to_dict()}"
    assert any(words.lower() in i.problem.lower() for i in named), named
    assert all(i.hint for i in named)
    assert report.ok == (severity == "warnings")
    assert not any(i.file == "good.png" for i in report.errors + report.warnings)


@pytest.mark.parametrize("case", list(CASES))
def test_cli_validate_exit_code_and_json(tmp_path, case, capsys):
    builder, file, severity, _ = CASES[case]
    d = _build(tmp_path / "ds", builder)
    rc = main(["data", "validate", str(d), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == (1 if severity == "errors" else 0)
    assert out["ok"] is (rc == 0)
    assert any(file in (i["file"] + i["problem"]) for i in out[severity])


@pytest.mark.parametrize("limit", [5_000, 9_000])  # above 2x limit Pillow raises; in between it only warns
def test_decompression_bomb_is_an_error_per_file(tmp_path, limit):
    d = _build(tmp_path / "ds", lambda d: _pair(d, "bomb.png", _encode(Image.new("RGB", (100, 100)))))
    (d / "good.png").write_bytes(_encode(_noise((64, 64))))   # 4096 px: under both limits
    before = Image.MAX_IMAGE_PIXELS
    report = data.validate_dataset(d, max_pixels=limit)
    assert [i.file for i in report.errors] == ["bomb.png"]
    assert "decompression bomb" in report.errors[0].problem
    assert Image.MAX_IMAGE_PIXELS == before   # the limit was scoped to the call


def test_every_bad_file_in_one_tree_is_named_in_the_table(tmp_path, capsys):
    for case, (builder, *_) in CASES.items():      # one sub-folder per case: files are read recursively
        _build(tmp_path / "ds" / case, builder)
    assert main(["data", "validate", str(tmp_path / "ds")]) == 1
    table = capsys.readouterr().out
    rows = {line.split()[1]: line.split()[0] for line in table.splitlines() if line.startswith(("error", "warning"))}
    for case, (_, file, severity, _) in CASES.items():
        assert rows.get(f"{case}/{file}") == severity[:-1], (case, table)


def test_no_images_is_an_error(tmp_path):
    report = data.validate_dataset(tmp_path)
    assert not report.ok and report.errors[0].file == "."
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.validate_dataset(tmp_path / "nope")


def test_metadata_jsonl_supplies_captions(tmp_path):
    d = tmp_path / "ds"
    _pair(d / "sub", "a.png", _encode(_noise()), caption=None)
    (d / "metadata.jsonl").write_text(json.dumps({"file_name": "sub/a.png", "text": "from metadata"}) + "\n"
                                      + json.dumps({"file_name": "gone.png", "text": "x"}) + "\n")
    report = data.validate_dataset(d)
    assert report.ok, report.format()
    assert report.stats["n_pairs"] == 1
    assert [i.file for i in report.warnings] == ["gone.png"]
    assert data.ImageCaptionDataset(d)[0]["caption"] == "from metadata"


def test_stats(tmp_path):
    d = tmp_path / "ds"
    _pair(d, "a.png", _encode(_noise((64, 100))), b"one two three")
    _pair(d, "b.png", _encode(_noise((120, 70))), b"one two three four five")
    _pair(d, "c.png", (d / "a.png").read_bytes(), b"\xef\xbb\xbfone")   # BOM is tolerated
    s = data.validate_dataset(d).stats
    assert (s["n_images"], s["n_captions"], s["n_pairs"]) == (3, 3, 3)
    assert (s["width_min"], s["width_max"], s["height_min"], s["height_max"]) == (64, 120, 70, 100)
    assert (s["caption_words_min"], s["caption_words_median"], s["caption_words_max"]) == (1, 3, 5)
    assert s["duplicates"] == [["a.png", "c.png"]]


# --- conversions ----------------------------------------------------------------------------------
def test_to_rgb_rescales_16_bit_and_composites_alpha_on_white():
    a = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    rgb = np.asarray(data.to_rgb(Image.fromarray(a)))
    assert rgb.shape == (1, 3, 3) and rgb[0, :, 0].tolist() == [0, 100, 255]
    rgba = Image.new("RGBA", (2, 1), (10, 20, 30, 0))
    rgba.putpixel((1, 0), (10, 20, 30, 255))
    assert np.asarray(data.to_rgb(rgba)).tolist() == [[[255, 255, 255], [10, 20, 30]]]


# --- sample and shapes ----------------------------------------------------------------------------
def test_sample_dataset_copies_captioned_photos_and_validates(tmp_path, capsys):
    import skimage.data

    d = tmp_path / "sample"
    assert main(["data", "sample", str(d)]) == 0
    captions = json.loads((Path(data.__file__).parent.parent / "data/sample/captions.json").read_text())
    images = sorted(p for p in d.iterdir() if p.suffix in (".png", ".jpg"))
    assert len(images) >= 12
    src = Path(skimage.data.__file__).parent
    for p in images:
        assert p.read_bytes() == (src / p.name).read_bytes()
        assert p.with_suffix(".txt").read_text().strip() == captions[p.stem]
    capsys.readouterr()
    assert main(["data", "validate", str(d)]) == 0
    assert "OK" in capsys.readouterr().out


def test_shapes_validate_ok_via_cli(tmp_path):
    d = tmp_path / "shapes"
    assert main(["data", "shapes", str(d), "--n", "12", "--seed", "3", "--aspect-every", "4"]) == 0
    assert main(["data", "validate", str(d)]) == 0
    assert len(list(d.glob("*.png"))) == 12


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_shapes_deterministic_and_seed_dependent(tmp_path):
    a = _files(data.make_shapes_dataset(tmp_path / "a", n=10, seed=1))
    b = _files(data.make_shapes_dataset(tmp_path / "b", n=10, seed=1))
    c = _files(data.make_shapes_dataset(tmp_path / "c", n=10, seed=2))
    assert a == b
    assert a.keys() == c.keys() and a != c
    # Rebuilding smaller in the same folder removes the stale files.
    data.make_shapes_dataset(tmp_path / "a", n=4, seed=1)
    assert len(list((tmp_path / "a").glob("shape_*.png"))) == 4


def test_shapes_pixels_match_captions(tmp_path):
    d = data.make_shapes_dataset(tmp_path / "s", n=40, seed=0, aspect_every=5)
    areas = {"small": [], "large": []}
    for line in (d / "attributes.jsonl").read_text().splitlines():
        a = json.loads(line)
        assert (d / a["file_name"]).with_suffix(".txt").read_text().strip() == a["caption"]
        assert a["colour"] in a["caption"] and a["shape"] in a["caption"] and a["position"] in a["caption"]
        im = np.asarray(Image.open(d / a["file_name"]))
        h, w, _ = im.shape
        assert (w, h) == (a["width"], a["height"])
        row, col = divmod(data.POSITIONS.index(a["position"]), 3)
        for r in range(3):
            for c in range(3):
                px = im[int((r + 0.5) * h / 3), int((c + 0.5) * w / 3)].tolist()
                want = list(data.SHAPE_COLOURS[a["colour"]]) if (r, c) == (row, col) else [255, 255, 255]
                assert px == want, (a, r, c)
        areas[a["scale"]].append(int((im != 255).any(-1).sum()) / min(w, h) ** 2)
    assert areas["small"] and areas["large"] and max(areas["small"]) < min(areas["large"])


# --- buckets --------------------------------------------------------------------------------------
@pytest.mark.parametrize("res,step", [(64, 16), (64, 64), (256, 32), (512, 64), (1024, 64), (200, 48)])
def test_aspect_buckets(res, step):
    buckets = data.aspect_buckets(res, step)
    assert len(set(buckets)) == len(buckets)
    for h, w in buckets:
        assert h % step == 0 and w % step == 0
        assert h * w <= res * res
        assert max(h / w, w / h) <= 2.0
    if res % step == 0:
        assert (res, res) in buckets
    assert max(h * w for h, w in buckets) >= 0.75 * res * res


def test_bucket_step_must_be_a_multiple_of_16():
    with pytest.raises(ValueError, match="multiple of 16"):
        data.aspect_buckets(64, 24)


def test_nearest_bucket_keeps_orientation():
    buckets = data.aspect_buckets(512, 64)
    assert data.nearest_bucket(600, 900, buckets) == (640, 384)    # portrait W=600, H=900 -> (H, W)
    assert data.nearest_bucket(900, 600, buckets) == (384, 640)
    assert data.nearest_bucket(300, 300, buckets) == (512, 512)


# --- the dataset ----------------------------------------------------------------------------------
def test_dataset_items(tmp_path):
    d = data.make_shapes_dataset(tmp_path / "s", n=8, seed=0, aspect_every=4)
    ds = data.ImageCaptionDataset(d, resolution=64, bucket_step=16)
    assert len(ds) == 8 and len(ds.records) == 8
    for i in range(len(ds)):
        item = ds[i]
        path = Path(item["image_path"])
        h, w = item["bucket"]
        assert item["index"] == i and item["bucket"] == ds.bucket_of(i)
        assert item["pixels"].shape == (3, h, w) and item["pixels"].dtype.is_floating_point
        assert -1.0 <= item["pixels"].min() < 0 and item["pixels"].max() == 1.0   # white background is +1
        assert item["caption"] == path.with_suffix(".txt").read_text().strip()
        assert item["image_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        iw, ih = Image.open(path).size
        assert (h > w) == (ih > iw) and (h < w) == (ih < iw)
    # A square image at the bucket size passes through untouched.
    square = next(i for i in range(len(ds)) if ds.bucket_of(i) == (64, 64))
    want = np.asarray(Image.open(ds.records[square][0]), dtype=np.float32) / 127.5 - 1
    np.testing.assert_allclose(ds[square]["pixels"].permute(1, 2, 0).numpy(), want, atol=1e-6)


def test_dataset_random_crop_and_flip_follow_seed_and_epoch(tmp_path):
    d = tmp_path / "ds"
    _pair(d, "a.png", _encode(_noise((160, 64))))
    a = data.ImageCaptionDataset(d, center_crop=False, random_flip=True, seed=5)
    b = data.ImageCaptionDataset(d, center_crop=False, random_flip=True, seed=5)
    assert a[0]["pixels"].equal(b[0]["pixels"])
    seen = set()
    for e in range(8):
        a.set_epoch(e)
        seen.add(a[0]["pixels"].numpy().tobytes())
    assert len(seen) > 1


def test_dataset_refuses_bad_data_naming_the_file(tmp_path):
    d = _build(tmp_path / "ds", _truncated_png)
    with pytest.raises(ValueError, match=r"bad\.png"):
        data.ImageCaptionDataset(d)


# --- the sampler ----------------------------------------------------------------------------------
BUCKETS = [(64, 64)] * 23 + [(48, 80)] * 11 + [(80, 48)] * 7


def test_sampler_batches_are_single_bucket_unique_and_deterministic():
    s = data.BucketBatchSampler(BUCKETS, batch_size=4, seed=1)
    batches = list(s)
    assert len(batches) == len(s) == 23 // 4 + 11 // 4 + 7 // 4
    flat = [i for b in batches for i in b]
    assert len(flat) == len(set(flat))
    assert all(len(b) == 4 and len({BUCKETS[i] for i in b}) == 1 for b in batches)
    assert list(data.BucketBatchSampler(BUCKETS, batch_size=4, seed=1)) == batches
    assert list(data.BucketBatchSampler(BUCKETS, batch_size=4, seed=2)) != batches
    s.set_epoch(1)
    assert list(s) != batches


def test_sampler_keeps_partial_batches_without_drop_last():
    batches = list(data.BucketBatchSampler(BUCKETS, batch_size=4, drop_last=False))
    assert sorted(i for b in batches for i in b) == list(range(len(BUCKETS)))


@pytest.mark.parametrize("k", [0, 3, 7])
def test_sampler_resume_continues_exactly(k):
    full = list(data.BucketBatchSampler(BUCKETS, batch_size=3, seed=9))
    s = data.BucketBatchSampler(BUCKETS, batch_size=3, seed=9)
    it = iter(s)
    taken = [next(it) for _ in range(k)]
    state = json.loads(json.dumps(s.state_dict()))     # survives a JSON round trip (checkpoints)
    r = data.BucketBatchSampler(BUCKETS, batch_size=3, seed=9)
    r.load_state_dict(state)
    r.set_epoch(state["epoch"])                          # the trainer's usual call keeps the cursor
    assert taken + list(r) == full
    assert list(r) == full                               # the next pass is a whole epoch again


def test_sampler_resume_with_prefetch_uses_consumed_count():
    s = data.BucketBatchSampler(BUCKETS, batch_size=3, seed=9, drop_last=False)
    full = list(s)                                       # a DataLoader may have pulled everything
    r = data.BucketBatchSampler(BUCKETS, batch_size=3, seed=9, drop_last=False)
    r.load_state_dict(s.state_dict(consumed=5))
    assert list(r) == full[5:]
    with pytest.raises(ValueError, match="batch_size"):
        data.BucketBatchSampler(BUCKETS, batch_size=4, seed=9).load_state_dict(s.state_dict())


@pytest.mark.parametrize("drop_last", [True, False])
def test_sampler_ddp_shards(drop_last):
    world = 3
    shards = [list(data.BucketBatchSampler(BUCKETS, 4, seed=3, rank=r, world_size=world, drop_last=drop_last))
              for r in range(world)]
    assert len({len(s) for s in shards}) == 1            # equal step counts, or DDP hangs
    single = list(data.BucketBatchSampler(BUCKETS, 4, seed=3, drop_last=drop_last))
    ids = [tuple(b) for s in shards for b in s]
    if drop_last:
        assert len(ids) == len(set(ids)) and set(ids) <= {tuple(b) for b in single}
        assert len(ids) == len(single) - len(single) % world
        flat = [i for b in ids for i in b]
        assert len(flat) == len(set(flat))               # no image on two ranks
    else:
        assert {tuple(b) for b in single} == set(ids)    # padding repeats, never loses a batch


def test_sampler_drives_a_dataloader(tmp_path):
    import torch

    ds = data.ImageCaptionDataset(data.make_shapes_dataset(tmp_path / "s", n=12, aspect_every=3),
                                  resolution=64, bucket_step=16)
    sampler = data.BucketBatchSampler(ds.buckets, batch_size=2, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler)
    batches = list(loader)
    assert len(batches) == len(sampler) > 0
    for b in batches:
        assert b["pixels"].shape[0] == 2 and tuple(b["pixels"].shape[2:]) == ds.bucket_of(int(b["index"][0]))
