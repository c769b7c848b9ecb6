"""Content-addressed caches: hits only on unchanged content, atomic entries, verification."""

from __future__ import annotations

import copy
import hashlib
import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fluxlab import caches
from fluxlab.caches import LatentCache, PositionIdCache, TextEmbeddingCache, latent_preprocess
from fluxlab.commands.cache import cli_verify

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pipe():
    from fluxlab.models import load_pipeline

    return load_pipeline("tiny", "cpu", torch.float32)


def _png(h=32, w=24, seed=0, poke=None) -> bytes:
    """PNG bytes of a seeded random image; `poke=(y, x)` changes exactly one pixel."""
    import numpy as np
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    if poke:
        arr[poke] = (arr[poke].astype(int) + 1) % 256
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _pixels(png: bytes) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    arr = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1  # [3, H, W] in [-1, 1]


class Counted:
    """A pixels_fn that records how often the cache had to call it."""

    def __init__(self, png):
        self.png, self.calls = png, 0

    def __call__(self):
        self.calls += 1
        return _pixels(self.png)


PRE = latent_preprocess((32, 24), center_crop=True, random_flip=False)
SHA = hashlib.sha256(_png()).hexdigest()


# --- LatentCache --------------------------------------------------------------------------------
def test_latent_hit_when_unchanged_and_equal_to_fresh_encode(tmp_path, pipe):
    fn = Counted(_png())
    a = LatentCache(tmp_path, pipe.vae)
    mean, logvar = a.get(SHA, PRE, fn)
    assert mean.shape == logvar.shape == (16, 4, 3) and mean.dtype == torch.float32
    assert a.stats()["misses"] == 1 and fn.calls == 1
    a.get(SHA, PRE, fn)  # memory hit
    # A new object over the same folder (a new process, in effect) hits on disk.
    b = LatentCache(tmp_path, pipe.vae)
    mean_b, logvar_b = b.get(SHA, PRE, fn)
    assert fn.calls == 1, "a hit must not decode the image"
    assert a.stats()["hits"] == 1 and b.stats() == {"hits": 1, "misses": 0, "bytes": 2 * 16 * 4 * 3 * 4}
    with torch.no_grad():
        dist = pipe.vae.encode(_pixels(_png())[None]).latent_dist
    assert torch.equal(mean_b, dist.mean[0]) and torch.equal(logvar_b, dist.logvar[0])


@pytest.mark.parametrize("change", ["one pixel", "bucket 24x32", "bucket 32x32", "random crop", "random flip"])
def test_latent_miss_on_each_input_change(tmp_path, pipe, change):
    cache = LatentCache(tmp_path, pipe.vae)
    cache.get(SHA, PRE, Counted(_png()))
    png, bucket, crop, flip = _png(), (32, 24), True, False
    if change == "one pixel":
        png = _png(poke=(5, 7))
    elif change.startswith("bucket"):
        bucket = (24, 32) if change.endswith("24x32") else (32, 32)
    elif change == "random crop":
        crop = False
    else:
        flip = True
    fn = Counted(png)
    cache.get(hashlib.sha256(png).hexdigest(), latent_preprocess(bucket, crop, flip), fn)
    cache.get(SHA, PRE, Counted(_png()))  # and the original still hits
    assert fn.calls == 1 and cache.stats()["misses"] == 2 and cache.stats()["hits"] == 1
    # Augmented pixels differ per call, so they are encoded but never stored (bypass).
    augmented = change.startswith("random")
    assert cache.bypassed == int(augmented)
    assert len(list((tmp_path / "latent").glob("*/*.safetensors"))) == (1 if augmented else 2)


@pytest.mark.parametrize("what", ["weights", "config"])
def test_latent_miss_when_vae_changes(tmp_path, pipe, what):
    LatentCache(tmp_path, pipe.vae).get(SHA, PRE, Counted(_png()))
    vae2 = copy.deepcopy(pipe.vae)
    if what == "weights":
        with torch.no_grad():
            next(vae2.parameters()).view(-1)[0] += 1e-3
    else:
        vae2.register_to_config(shift_factor=0.0)
    cache = LatentCache(tmp_path, vae2)
    assert cache.identity != LatentCache(tmp_path, pipe.vae).identity
    fn = Counted(_png())
    cache.get(SHA, PRE, fn)
    assert cache.stats()["misses"] == 1 and fn.calls == 1


def test_random_flip_bypasses_the_cache(tmp_path, pipe):
    cache = LatentCache(tmp_path, pipe.vae)
    pre = latent_preprocess((32, 24), center_crop=True, random_flip=True)
    fn = Counted(_png())
    cache.get(SHA, pre, fn)
    cache.get(SHA, pre, fn)
    assert fn.calls == 2 and cache.stats()["hits"] == 0 and cache.bypassed == 2
    assert not list(tmp_path.rglob("*.safetensors"))


def test_sample_draws_from_the_distribution():
    mean = torch.full((16, 64, 64), 2.0)
    logvar = torch.full((16, 64, 64), 2 * torch.log(torch.tensor(0.5)).item())  # std 0.5
    x = LatentCache.sample(mean, logvar, torch.Generator().manual_seed(0))
    assert abs(x.mean().item() - 2.0) < 0.01 and abs(x.std().item() - 0.5) < 0.01
    y = LatentCache.sample(mean, logvar, torch.Generator().manual_seed(0))
    assert torch.equal(x, y)


# --- TextEmbeddingCache -------------------------------------------------------------------------
def _text_parts(pipe, **swap):
    parts = {k: getattr(pipe, k) for k in ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2")}
    return parts | swap


def test_text_hit_when_unchanged_and_equal_to_encode_prompt(tmp_path, pipe):
    a = TextEmbeddingCache(tmp_path, pipe, 16)
    emb, pooled = a.get("a red circle")
    assert emb.shape == (16, 32) and pooled.shape == (32,) and not emb.requires_grad
    b = TextEmbeddingCache(tmp_path, _text_parts(pipe), 16)  # components dict, same identity
    assert b.identity == a.identity
    emb_b, pooled_b = b.get("a red circle")
    assert a.stats()["misses"] == 1 and b.stats()["hits"] == 1 and b.stats()["misses"] == 0
    with torch.no_grad():
        ref, ref_pooled, _ = pipe.encode_prompt("a red circle", max_sequence_length=16)
    assert torch.equal(emb_b, ref[0]) and torch.equal(pooled_b, ref_pooled[0])


def _bumped(module):
    m = copy.deepcopy(module)
    with torch.no_grad():
        next(m.parameters()).view(-1)[0] += 1e-3
    return m


@pytest.mark.parametrize("change", ["caption", "max_length", "clip_weights", "t5_weights", "tokenizer"])
def test_text_miss_on_each_change(tmp_path, pipe, change):
    TextEmbeddingCache(tmp_path, pipe, 16).get("a red circle")
    caption, length, parts = "a red circle", 16, _text_parts(pipe)
    if change == "caption":
        caption = "a red circle."
    elif change == "max_length":
        length = 24
    elif change == "clip_weights":
        parts["text_encoder"] = _bumped(pipe.text_encoder)
    elif change == "t5_weights":
        parts["text_encoder_2"] = _bumped(pipe.text_encoder_2)
    else:
        tok = copy.deepcopy(pipe.tokenizer_2)
        tok.add_tokens(["<fluxlab-new-token>"])
        parts["tokenizer_2"] = tok
    cache = TextEmbeddingCache(tmp_path, parts, length)
    cache.get(caption)
    assert cache.stats()["misses"] == 1 and cache.stats()["hits"] == 0


# --- robustness ---------------------------------------------------------------------------------
def _damage_truncate(p: Path):
    p.write_bytes(p.read_bytes()[:-10])


def _damage_flip(p: Path):
    data = bytearray(p.read_bytes())
    data[-5] ^= 0xFF  # inside the tensor payload: the file still parses
    p.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_damage_truncate, _damage_flip], ids=["truncate", "flip"])
def test_verify_detects_and_evicts_corrupt_entry(tmp_path, pipe, damage):
    cache = LatentCache(tmp_path, pipe.vae)
    cache.get(SHA, PRE, Counted(_png()))
    png2 = _png(seed=1)
    cache.get(hashlib.sha256(png2).hexdigest(), PRE, Counted(png2))
    TextEmbeddingCache(tmp_path, pipe, 16).get("a red circle")
    bad = cache.path_for(next(iter(cache._seen)))
    damage(bad)
    assert cli_verify(str(tmp_path)) == 1
    assert not bad.exists()
    res = caches.verify_cache(tmp_path)  # the survivors are sound
    assert res == {"checked": 2, "corrupt": [], "evicted": 0}


def test_corrupt_entry_is_a_miss_on_read(tmp_path, pipe):
    LatentCache(tmp_path, pipe.vae).get(SHA, PRE, Counted(_png()))
    (entry,) = (tmp_path / "latent").glob("*/*.safetensors")
    _damage_flip(entry)
    cache = LatentCache(tmp_path, pipe.vae)
    fn = Counted(_png())
    mean, _ = cache.get(SHA, PRE, fn)
    assert fn.calls == 1 and cache.corrupt_evicted == [str(entry)]
    caches.read_entry(entry)  # recomputed and rewritten whole


_WRITER = textwrap.dedent("""
    import sys, time, torch
    from pathlib import Path
    from fluxlab import caches
    root, go = Path(sys.argv[1]), Path(sys.argv[2])
    class Store(caches.ContentCache):
        kind = "latent"
    key = "ab" * 32
    tensors = {"mean": torch.arange(16 * 64 * 64, dtype=torch.float32).reshape(16, 64, 64)}  # 256 KiB
    print("ready", flush=True)
    while not go.exists():
        time.sleep(0.005)
    bad = 0
    for i in range(10):
        store = Store(root, memory=False)
        store._lookup(key, lambda: tensors, {})          # both processes miss, both write
        caches.atomic_write_bytes(store.path_for(key), caches._encode_entry(key, tensors, {}))
        try:
            assert torch.equal(caches.read_entry(store.path_for(key), key)["mean"], tensors["mean"])
        except Exception as e:
            bad += 1
            print("bad read:", e, flush=True)
    sys.exit(1 if bad else 0)
""")


def test_two_processes_writing_one_entry_leave_it_valid(tmp_path):
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), str(go)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        go.touch()  # release both at once
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
    res = caches.verify_cache(tmp_path)
    assert res["checked"] == 1 and res["corrupt"] == []
    assert not list(tmp_path.rglob("*.tmp")), "a writer left its temp file behind"


# --- PositionIdCache ----------------------------------------------------------------------------
@pytest.mark.parametrize("lh,lw", [(4, 4), (6, 10), (128, 96)])
def test_position_ids_match_diffusers(lh, lw):
    from diffusers import FluxPipeline

    cache = PositionIdCache()
    img, txt = cache.get(lh, lw, 7, "cpu", torch.bfloat16)
    ref = FluxPipeline._prepare_latent_image_ids(1, lh // 2, lw // 2, "cpu", torch.bfloat16)
    assert img.shape == (lh // 2 * lw // 2, 3) and torch.equal(img, ref) and img.dtype == torch.bfloat16
    assert txt.shape == (7, 3) and not txt.any()
    assert cache.get(lh, lw, 7, "cpu", torch.bfloat16)[0] is img
    assert cache.stats() == {"hits": 1, "misses": 1, "bytes": (img.numel() + txt.numel()) * 2}


def test_position_lru_bound_and_precompute():
    cache = PositionIdCache(maxsize=3)
    cache.precompute([(32, 32), (32, 48), (48, 32)], 16, "cpu", torch.float32)
    assert len(cache) == 3 and cache.stats()["hits"] == cache.stats()["misses"] == 0
    cache.get(4, 4, 16, "cpu", torch.float32)      # (32, 32) px -> 4x4 latent: hit, now newest
    cache.get(8, 8, 16, "cpu", torch.float32)      # miss: evicts the least recent, (4, 6)
    assert len(cache) == 3
    cache.get(4, 4, 16, "cpu", torch.float32)
    cache.get(4, 6, 16, "cpu", torch.float32)      # evicted earlier: a miss again
    cache.get(4, 4, 16, "cpu", torch.float64)      # dtype is part of the key
    assert cache.stats()["hits"] == 2 and cache.stats()["misses"] == 3 and len(cache) == 3
    with pytest.raises(ValueError):
        PositionIdCache(maxsize=0)


# --- fluxlab cache build / stats ----------------------------------------------------------------
def test_cli_build_counts_this_calls_lookups(tmp_path, pipe, capsys):
    import json

    from fluxlab.cli import main
    from fluxlab.data import ImageCaptionDataset, make_shapes_dataset

    data = make_shapes_dataset(tmp_path / "data", n=3, seed=0, size=64)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: tiny\ndata: {data}\ncache_dir: {tmp_path / 'cache'}\nresolution: 64\n"
                   f"max_sequence_length: 16\ndevice: cpu\n")
    ds = ImageCaptionDataset(data, 64)
    n_captions = len({c for _, c in ds.records})
    n_buckets = len(set(ds.buckets))

    def build():
        capsys.readouterr()
        assert main(["cache", "build", str(cfg), "--set", "seed=1", "--json"]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    first, second = build(), build()
    assert first["latent"]["misses"] == 3 and first["latent"]["hits"] == 0
    assert first["text"]["misses"] == n_captions and first["text"]["hits"] == 3 - n_captions
    assert first["position"]["misses"] == n_buckets
    assert second["latent"] == {"hits": 3, "misses": 0, "bytes": first["latent"]["bytes"]}
    assert second["text"] == {"hits": 3, "misses": 0, "bytes": first["text"]["bytes"]}
    assert first["latent"]["bytes"] == 3 * 2 * 16 * 8 * 8 * 4  # mean + logvar, [16, 8, 8] fp32 each

    assert main(["cache", "stats", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert "latent    entries      3" in out and "last build" in out
    assert main(["cache", "verify", str(tmp_path / "cache")]) == 0
    assert f"checked {3 + n_captions} entries, 0 corrupt" in capsys.readouterr().out
