"""Content-addressed caches for training: VAE latents, text embeddings, position ids.

Every disk entry is keyed on *content*, never on a file name or an index: the SHA-256 of the
inputs (image bytes / caption text), the identity of the model that produced it (config +
weights hash) and every preprocessing choice. So a changed image, caption, VAE, encoder or
preprocessing always misses and an unchanged one always hits, whatever the file is called.

Layout under `cache_dir`::

    latent/<key[:2]>/<key>.safetensors   mean, logvar            [16, H/8, W/8] fp32
    text/<key[:2]>/<key>.safetensors     prompt_embeds, pooled   [S, D], [D_pool] (encoder dtype)
    last_build.json                      counters of the last `fluxlab cache build`

Each entry's safetensors metadata carries its key and the SHA-256 of its tensor bytes, so a
flipped byte or a truncated file is detected on read (treated as a miss, evicted, recomputed)
and by `verify_cache`. Writes go to a temp file in the same folder, fsync, then os.replace:
two processes filling the same entry each publish a whole file, and the last rename wins.

Cost of identities: the model hash reads every weight once per cache object (sha256 runs at
~1-2 GB/s; the FLUX VAE (~170 MB fp32) is well under a second, T5-XXL (~9.5 GB bf16) several
seconds). It is paid once at start-up, never per look-up.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import stat
import struct
import sys
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from fluxlab._atomic import atomic_write_bytes  # noqa: F401  (also this module's public name)
from fluxlab.errors import UserFileNotFound

# Bump when the entry format or the key recipe changes: old entries then simply miss.
FORMAT_VERSION = 1
ENTRY_SUFFIX = ".safetensors"
KINDS = ("latent", "text")
STALE_TEMP_S = 3600  # a temp file this old belongs to a dead writer


# --- hashing ------------------------------------------------------------------------------------
def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """Raw bytes of a tensor (any dtype, bf16 included) without a dtype conversion."""
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())


# Config keys that name where or how a model was loaded, not what it computes. The dtype is
# left out here because the weight bytes already carry it.
_VOLATILE_CONFIG_KEYS = {"transformers_version", "dtype", "torch_dtype", "architectures"}


def _model_config(module: torch.nn.Module) -> dict:
    cfg = getattr(module, "config", None)
    if cfg is None:
        return {}
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    return {k: v for k, v in cfg.items() if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS}


def module_identity(module: torch.nn.Module) -> str:
    """SHA-256 of a model's class, config and every weight's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    h.update(type(module).__name__.encode())
    h.update(json.dumps(_model_config(module), sort_keys=True, default=str).encode())
    for name, t in sorted(module.state_dict().items()):
        if t.device.type == "meta":
            raise ValueError(f"cannot hash {type(module).__name__}.{name}: its weights are on the meta "
                             f"device (offloaded?); load the model fully before building caches.")
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def tokenizer_identity(tok) -> str:
    """SHA-256 of everything that decides a tokenizer's ids: vocab, merges, normalizer, specials."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        # Each call re-sets the backend's truncation/padding to that call's arguments: call state,
        # not identity (the max length is part of the key on its own).
        spec.pop("truncation", None), spec.pop("padding", None)
    else:
        spec = tok.get_vocab()
    return _sha256_json({"class": type(tok).__name__, "spec": spec,
                         "specials": list(getattr(tok, "all_special_tokens", [])),
                         "model_max_length": getattr(tok, "model_max_length", None),
                         "padding_side": getattr(tok, "padding_side", None)})


def _payload_sha256(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()




# --- one entry on disk --------------------------------------------------------------------------
class CorruptEntry(ValueError):
    """A cache file that does not parse or whose tensors do not match their recorded hash."""


def _encode_entry(key: str, tensors: dict[str, torch.Tensor], info: dict[str, str]) -> bytes:
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {**info, "key": key, "format": str(FORMAT_VERSION), "sha256": _payload_sha256(tensors)}
    return save(tensors, metadata=meta)


def read_entry(path: Path, key: str | None = None) -> dict[str, torch.Tensor]:
    """Load one entry and check it: parses, key matches its name, tensor bytes match their hash.

    Raises CorruptEntry (naming the file) on any mismatch or when the path is not a regular file
    (a folder or a link named like an entry), FileNotFoundError when absent.
    """
    from safetensors.torch import load

    path = Path(path)
    mode = path.lstat().st_mode  # lstat: never follow a link, never open a FIFO (it would block)
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a symlink" if stat.S_ISLNK(mode) else "not a regular file"
        raise CorruptEntry(f"{path}: is {kind}, not a cache entry; run `fluxlab cache verify` to evict it")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CorruptEntry(f"{path}: cannot be read ({e.strerror or e}); run `fluxlab cache verify` to evict it") from e
    try:
        (n,) = struct.unpack("<Q", data[:8])
        meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
        tensors = load(data)
    except Exception as e:  # struct/json/safetensors all signal a damaged file differently
        raise CorruptEntry(f"{path}: unreadable cache entry ({type(e).__name__}: {e}); "
                           f"run `fluxlab cache verify` to evict it") from e
    want_key = key or Path(path).name.removesuffix(ENTRY_SUFFIX)
    if meta.get("key") != want_key:
        raise CorruptEntry(f"{path}: entry records key {meta.get('key')!r}, not its file name; "
                           f"run `fluxlab cache verify` to evict it")
    if meta.get("sha256") != _payload_sha256(tensors):
        raise CorruptEntry(f"{path}: tensor bytes do not match the recorded SHA-256; "
                           f"run `fluxlab cache verify` to evict it")
    return tensors


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


# --- the shared content-addressed store ---------------------------------------------------------
class ContentCache:
    """Base of LatentCache and TextEmbeddingCache: memory dict over content-addressed files.

    Counters (since `reset_stats`): `hits` (memory or disk), `misses` (computed), `bytes` (size
    of the distinct entries behind those look-ups: the working set's footprint).
    """

    kind: str = ""

    def __init__(self, cache_dir: str | os.PathLike, *, memory: bool = True):
        self.root = Path(cache_dir) / self.kind
        self.memory = memory
        self._mem: dict[str, dict[str, torch.Tensor]] = {}
        self.corrupt_evicted: list[str] = []   # paths
        self.corrupt_reasons: list[str] = []   # "path: why", one per eviction
        self.reset_stats()

    def reset_stats(self) -> None:
        self.hits = self.misses = 0
        self._seen: dict[str, int] = {}

    def reopen(self, cache_dir: str | os.PathLike) -> "ContentCache":
        """The same cache (model, identity, options) over `cache_dir`, with an empty memory layer and
        fresh counters, as a new process would open it, without hashing the model again."""
        other = copy.copy(self)
        ContentCache.__init__(other, cache_dir, memory=self.memory)
        return other

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "bytes": sum(self._seen.values())}

    def path_for(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}{ENTRY_SUFFIX}"

    def _lookup(self, key: str, compute: Callable[[], dict[str, torch.Tensor]],
                info: dict[str, str]) -> dict[str, torch.Tensor]:
        tensors = self._mem.get(key)
        if tensors is None:
            tensors = self._read(key)
        if tensors is not None:
            self.hits += 1
        else:
            self.misses += 1
            tensors = {k: v.detach().to("cpu") for k, v in compute().items()}
            atomic_write_bytes(self.path_for(key), _encode_entry(key, tensors, info))
        if self.memory:
            self._mem[key] = tensors
        self._seen[key] = _nbytes(tensors)
        return tensors

    def _read(self, key: str) -> dict[str, torch.Tensor] | None:
        path = self.path_for(key)
        try:
            return read_entry(path, key)
        except FileNotFoundError:
            return None
        except CorruptEntry as e:
            # A damaged entry is a miss: evict it and recompute rather than train on garbage.
            moved = evict(path, self.root.parent)
            self.corrupt_evicted.append(str(path))
            self.corrupt_reasons.append(str(e).split("; run")[0] + (f" (moved to {moved})" if moved else ""))
            return None


def _no_grad_encode(fn):
    # Cached tensors must be plain (not inference-mode) tensors: the trainer feeds them to autograd.
    def wrapped(*a, **k):
        with torch.no_grad():
            return fn(*a, **k)
    return wrapped


# --- latents ------------------------------------------------------------------------------------
def latent_preprocess(bucket: tuple[int, int], center_crop: bool, random_flip: bool) -> dict:
    """The preprocessing record a LatentCache key is built from. Trainer and `cache build` both
    call this, so the two can never disagree about what a cached latent means.

    Without center_crop the dataset crops at a random offset (drawn from seed, epoch, index): that
    is augmentation, marked `random_crop`, and LatentCache bypasses it like a random flip.
    """
    return {"bucket": [int(bucket[0]), int(bucket[1])], "center_crop": bool(center_crop),
            "random_crop": not center_crop, "random_flip": bool(random_flip)}


class LatentCache(ContentCache):
    """VAE latent distributions keyed on image bytes + VAE identity + preprocessing.

    Stores the distribution (mean, logvar), not one sample, so each step can draw a fresh
    latent (`sample`) exactly as encoding every step would.
    """

    kind = "latent"

    def __init__(self, cache_dir: str | os.PathLike, vae, *, memory: bool = True):
        super().__init__(cache_dir, memory=memory)
        self.vae = vae
        self.identity = module_identity(vae)
        self.bypassed = 0

    def get(self, image_sha256: str, preprocess: dict,
            pixels_fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, logvar), each [16, H/8, W/8] fp32 on the CPU. `pixels_fn` is called only on a miss.

        Random augmentation makes pixels differ per call for the same image, so a cached latent
        would be wrong: with `preprocess["random_flip"]` (or any true `random_*` key) the cache is
        bypassed (counted as a miss, nothing stored).
        """
        if any(v for k, v in preprocess.items() if k.startswith("random")):
            self.misses += 1
            self.bypassed += 1
            out = self._encode(pixels_fn)
            return out["mean"], out["logvar"]
        key = _sha256_json({"v": FORMAT_VERSION, "kind": self.kind, "image": image_sha256,
                            "vae": self.identity, "preprocess": preprocess})
        info = {"image_sha256": image_sha256, "vae": self.identity, "preprocess": json.dumps(preprocess)}
        out = self._lookup(key, lambda: self._encode(pixels_fn), info)
        return out["mean"], out["logvar"]

    @_no_grad_encode
    def _encode(self, pixels_fn) -> dict[str, torch.Tensor]:
        p = next(self.vae.parameters())
        pixels = pixels_fn()  # [3, H, W] in [-1, 1]
        dist = self.vae.encode(pixels[None].to(p.device, p.dtype)).latent_dist
        return {"mean": dist.mean[0].float().cpu(),       # [16, H/8, W/8]
                "logvar": dist.logvar[0].float().cpu()}   # [16, H/8, W/8]

    @staticmethod
    def sample(mean: torch.Tensor, logvar: torch.Tensor,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """One draw from N(mean, exp(logvar)), as DiagonalGaussianDistribution.sample does.

        The caller then applies `(x - FLUX_VAE_SHIFT) * FLUX_VAE_SCALE`.
        """
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype,
                            device=generator.device if generator is not None else mean.device)
        return mean + torch.exp(0.5 * logvar) * noise.to(mean.device)


# --- text embeddings ----------------------------------------------------------------------------
class TextEmbeddingCache(ContentCache):
    """T5 sequence embeddings + CLIP pooled embedding keyed on caption + tokenizers + encoders +
    max sequence length. Encoding is FluxPipeline.encode_prompt itself (no re-implementation).

    `pipe_or_components`: a FluxPipeline, or a dict with tokenizer, tokenizer_2, text_encoder,
    text_encoder_2 (a pipeline without transformer and VAE is built around them).
    """

    kind = "text"

    def __init__(self, cache_dir: str | os.PathLike, pipe_or_components, max_sequence_length: int,
                 *, memory: bool = True):
        super().__init__(cache_dir, memory=memory)
        pipe = pipe_or_components
        if isinstance(pipe, dict):
            from diffusers import FluxPipeline

            parts = {k: pipe.get(k) for k in ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2")}
            missing = [k for k, v in parts.items() if v is None]
            if missing:
                raise ValueError(f"TextEmbeddingCache needs {', '.join(missing)} in its components")
            pipe = FluxPipeline(scheduler=None, vae=None, transformer=None, **parts)
        self.pipe = pipe
        self.max_sequence_length = int(max_sequence_length)
        # FLUX.1: CLIP + T5 (both tokenizers and encoders); FLUX.2: one tokenizer and encoder.
        parts = {k: getattr(pipe, k, None) for k in ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2")}
        self.identity = _sha256_json({
            **{k: tokenizer_identity(v) if k.startswith("tokenizer") else module_identity(v)
               for k, v in parts.items() if v is not None},
            "max_sequence_length": self.max_sequence_length})

    def get(self, caption: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prompt_embeds [S, D], pooled [D_pool] or None for FLUX.2) on the CPU in the encoders' dtype."""
        key = _sha256_json({"v": FORMAT_VERSION, "kind": self.kind, "caption": caption,
                            "encoders": self.identity})
        out = self._lookup(key, lambda: self._encode(caption), {"caption": caption})
        return out["prompt_embeds"], out.get("pooled")

    @_no_grad_encode
    def _encode(self, caption: str) -> dict[str, torch.Tensor]:
        # On the encoders' own device (the GPU for a real-scale pipeline); _lookup keeps a CPU copy.
        encoder = getattr(self.pipe, "text_encoder_2", None) or self.pipe.text_encoder
        out = self.pipe.encode_prompt(caption, device=next(encoder.parameters()).device,
                                      max_sequence_length=self.max_sequence_length)
        if len(out) == 2:  # FLUX.2: (prompt_embeds, text_ids), no pooled embedding
            return {"prompt_embeds": out[0][0]}                 # [S, D]
        return {"prompt_embeds": out[0][0], "pooled": out[1][0]}  # [S, D], [D_pool]


# --- position ids -------------------------------------------------------------------------------
class PositionIdCache:
    """img_ids / txt_ids per (latent size, text length, device, dtype), LRU-bounded in memory.

    `bytes` is what the LRU holds now.
    """

    def __init__(self, maxsize: int = 32):
        if maxsize < 1:
            raise ValueError(f"PositionIdCache maxsize must be >= 1, got {maxsize}")
        self.maxsize = maxsize
        self._lru: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.reset_stats()

    def reset_stats(self) -> None:
        self.hits = self.misses = 0
        self.by_size: dict[tuple[int, int], dict[str, int]] = {}  # (latent_h, latent_w) -> hits, misses

    def stats(self) -> dict[str, int]:
        held = sum(_nbytes({"i": i, "t": t}) for i, t in self._lru.values())
        return {"hits": self.hits, "misses": self.misses, "bytes": held}

    def __len__(self) -> int:
        return len(self._lru)

    def get(self, latent_h: int, latent_w: int, text_len: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(img_ids [latent_h/2 * latent_w/2, 3], txt_ids [text_len, 3]) for packed 2x2 latents."""
        key = (int(latent_h), int(latent_w), int(text_len), str(torch.device(device)), dtype)
        hit = self._lru.get(key)
        size = self.by_size.setdefault((int(latent_h), int(latent_w)), {"hits": 0, "misses": 0})
        if hit is not None:
            self.hits += 1
            size["hits"] += 1
            self._lru.move_to_end(key)
            return hit
        self.misses += 1
        size["misses"] += 1
        from diffusers import FluxPipeline

        img_ids = FluxPipeline._prepare_latent_image_ids(None, latent_h // 2, latent_w // 2, device, dtype)
        txt_ids = torch.zeros(text_len, 3, device=device, dtype=dtype)  # as FluxPipeline.encode_prompt
        self._lru[key] = (img_ids, txt_ids)
        if len(self._lru) > self.maxsize:
            self._lru.popitem(last=False)
        return img_ids, txt_ids

    def precompute(self, buckets: Iterable[tuple[int, int]], text_len: int, device, dtype,
                   *, vae_scale_factor: int = 8) -> None:
        """Fill the LRU for pixel-space `buckets` (H, W); not counted as look-ups."""
        hits, misses, by_size = self.hits, self.misses, {k: dict(v) for k, v in self.by_size.items()}
        for h, w in buckets:
            self.get(h // vae_scale_factor, w // vae_scale_factor, text_len, device, dtype)
        self.hits, self.misses, self.by_size = hits, misses, by_size


# --- verification -------------------------------------------------------------------------------
def evict(path: Path, cache_dir: Path) -> Path | None:
    """Take a bad entry out of the cache. A regular file (fluxlab wrote it) is deleted; anything
    else named like an entry (a folder, a link) fluxlab did not write, so it is moved, whole, to
    `<cache_dir>/evicted/` rather than deleted. Returns where it went (None: deleted or gone)."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISREG(mode):
        path.unlink(missing_ok=True)
        return None
    dest = Path(cache_dir) / "evicted" / f"{path.name}-{uuid.uuid4().hex[:8]}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(path), str(dest))
    return dest



def _entries(cache_dir: Path):
    for kind in KINDS:
        yield from sorted((cache_dir / kind).glob(f"*/*{ENTRY_SUFFIX}"))


def verify_cache(cache_dir: str | os.PathLike) -> dict:
    """Read and check every entry; delete corrupt ones (and temp files of dead writers).

    Returns dict(checked, corrupt: list of "path: reason", evicted).
    """
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise UserFileNotFound(f"{cache_dir}: no such cache directory; check the path "
                                f"(`fluxlab cache build CONFIG` creates it)")
    checked, corrupt, evicted = 0, [], 0
    for path in _entries(cache_dir):
        checked += 1
        try:
            read_entry(path)
        except CorruptEntry as e:
            moved = evict(path, cache_dir)
            corrupt.append(str(e).split("; run")[0] + (f" (moved to {moved})" if moved else ""))
            evicted += 1
    now = time.time()
    for kind in KINDS:
        for tmp in (cache_dir / kind).glob("*/.*.tmp"):
            if tmp.is_file() and not tmp.is_symlink() and now - tmp.stat().st_mtime > STALE_TEMP_S:
                tmp.unlink(missing_ok=True)
    return {"checked": checked, "corrupt": corrupt, "evicted": evicted}


def disk_usage(cache_dir: str | os.PathLike) -> dict[str, dict[str, int]]:
    """Entries and bytes on disk per kind."""
    out = {}
    for kind in KINDS:
        files = [f for f in (Path(cache_dir) / kind).glob(f"*/*{ENTRY_SUFFIX}") if f.is_file()]
        out[kind] = {"entries": len(files), "bytes": sum(f.stat().st_size for f in files)}
    return out


# --- filling the caches for a config ----------------------------------------------------------
def report_evictions(*caches: ContentCache) -> None:
    """Say on stderr which corrupt entries a build or training evicted (and recomputed)."""
    lines = [line for c in caches for line in c.corrupt_reasons]
    if lines:
        print(f"fluxlab: evicted {len(lines)} corrupt cache entr{'y' if len(lines) == 1 else 'ies'} and recomputed "
              f"{'it' if len(lines) == 1 else 'them'}:\n" + "\n".join(f"  {line}" for line in lines), file=sys.stderr)
