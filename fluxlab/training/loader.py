"""What the training loop reads: every image and caption encoded once through the
content-addressed caches, held in memory, and served in aspect buckets by a seeded, resumable
sampler through a DataLoader whose workers leave signals to the main process."""

from __future__ import annotations

import hashlib
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.utils import logging as dlog

from fluxlab.caches import LatentCache, PositionIdCache, TextEmbeddingCache, latent_preprocess, report_evictions
from fluxlab.config import TrainConfig
from fluxlab.data import BucketBatchSampler, ImageCaptionDataset
from fluxlab.errors import printable
from fluxlab.training.setup import barrier


class CachedItems(torch.utils.data.Dataset):
    """What the DataLoader workers serve: cached latent distributions and text embeddings per
    training item, or pixels when per-epoch augmentation makes latents uncacheable.

    Indexed by (epoch, item): the epoch travels with each index, so persistent workers (which
    never see the main process's set_epoch) still draw the right crop/flip.
    """

    def __init__(self, items: list[dict], base=None, dataset_index: list[int] | None = None):
        self.items, self.base, self.dataset_index = items, base, dataset_index

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key):
        epoch, i = key
        out = dict(self.items[i])
        if self.base is not None:  # latents are encoded in the training process from these pixels
            self.base.set_epoch(epoch)
            item = self.base[self.dataset_index[i]]
            out["pixels"], out["image_sha256"] = item["pixels"], item["image_sha256"]  # [3, H, W]
        return out


def worker_ignores_signals(worker_id: int) -> None:
    """DataLoader workers ignore SIGINT/SIGTERM: a signal to the whole process group (Ctrl-C, a
    scheduler's SIGTERM) must reach the main process alone, which finishes the step, checkpoints,
    and shuts the workers down itself. (Torch's own worker SIGTERM handler would let the worker die,
    and the main process then fails wherever it is, mid-checkpoint included.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def collate(items: list[dict]) -> dict:
    out = {}
    for k in items[0]:
        v = [it[k] for it in items]
        out[k] = torch.stack(v) if isinstance(v[0], torch.Tensor) else v
    return out


class EpochTagged:
    """Batch sampler wrapper: yields [(epoch, i), ...] so the dataset knows the epoch."""

    def __init__(self, sampler):
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for batch in self.sampler:
            yield [(self.sampler.epoch, i) for i in batch]


def open_dataset(cfg: TrainConfig, world: int) -> ImageCaptionDataset:
    """The dataset of `cfg.data`, checked to be large enough for `world` processes."""
    ds = ImageCaptionDataset(cfg.data, cfg.resolution, center_crop=cfg.center_crop, random_flip=cfg.random_flip,
                             seed=cfg.seed)
    cfg.check_dataset_size(len(ds), world)
    return ds


@dataclass
class TrainData:
    batches: "Batches"
    val_items: list[dict]
    """The held-out items (the last validation_size images), always with latents: no augmentation."""
    latent_cache: LatentCache | None
    """Only when latents are encoded every step (it holds the VAE); else None, and the VAE is freed."""
    encode_every_step: bool
    """Random crops / flips change pixels every epoch: latents are encoded per step from pixels."""
    cache_stats: dict


def encode_item(ds: ImageCaptionDataset, i: int, text_cache: TextEmbeddingCache,
                latent_cache: LatentCache | None, center_crop: bool) -> dict:
    """Item `i` through the content-addressed caches: its text embeddings and, with a latent
    cache, its VAE latent distribution (pixels are decoded only on a miss)."""
    rec_path, caption = ds.records[i]
    embeds, pooled = text_cache.get(caption)                        # [S, D], [Dp] (FLUX.2: no pooled)
    item = {"index": i, "prompt_embeds": embeds.float()}
    if pooled is not None:
        item["pooled"] = pooled.float()
    if latent_cache is not None:
        pre = latent_preprocess(ds.bucket_of(i), center_crop, False)
        sha = hashlib.sha256(Path(rec_path).read_bytes()).hexdigest()
        mean, logvar = latent_cache.get(sha, pre, lambda: ds[i]["pixels"])
        item.update(mean=mean, logvar=logvar)                       # [16, h, w] each
    return item


def build_caches(cfg: TrainConfig, pipe=None) -> dict[str, dict[str, int]]:
    """Fill the latent, text and position caches for every item of a TrainConfig's dataset, as
    training will read them (`fluxlab cache build`). Returns this call's counters per cache.
    Latents are skipped when augmentation is on (random flip or crop): training encodes those
    every step."""
    from fluxlab import models

    device = cfg.resolved_device()
    dtype = cfg.compute_dtype(device)  # the trainer's: the encoders' dtype is part of every cache key
    pipe = pipe or models.load_pipeline(cfg.model, device=device, dtype=dtype, transformer=False)
    ds = ImageCaptionDataset(cfg.data, cfg.resolution, center_crop=cfg.center_crop,
                             random_flip=cfg.random_flip, seed=cfg.seed)
    latents = LatentCache(cfg.cache_dir, pipe.vae, memory=False)
    texts = TextEmbeddingCache(cfg.cache_dir, pipe, cfg.max_sequence_length, memory=False)
    positions = PositionIdCache()
    augmented = cfg.random_flip or not cfg.center_crop
    if augmented:
        print("note: random flip/crop is on, so latents are encoded every step and not cached", file=sys.stderr)
    verbosity = dlog.get_verbosity()
    dlog.set_verbosity_error()  # encode_prompt warns once per caption it pads or truncates
    try:
        with torch.no_grad():
            for i in range(len(ds)):
                encode_item(ds, i, texts, None if augmented else latents, cfg.center_crop)
                h, w = ds.bucket_of(i)
                positions.get(h // pipe.vae_scale_factor, w // pipe.vae_scale_factor, cfg.max_sequence_length,
                              device, dtype)
    finally:
        dlog.set_verbosity(verbosity)
    report_evictions(latents, texts)
    return {"latent": latents.stats(), "text": texts.stats(), "position": positions.stats()}


def build_data(cfg: TrainConfig, ds: ImageCaptionDataset, pipe, rank: int, world: int,
               device: torch.device) -> TrainData:
    """Encode every image and caption once through the content-addressed caches, keep the
    results in memory, and build the bucketed, resumable DataLoader over them."""
    n_val = cfg.validation_size if cfg.validation_every > 0 else 0
    # Hold the last `validation_size` images out of training: a fixed validation batch.
    train_index = list(range(len(ds) - n_val))
    val_index = list(range(len(ds) - n_val, len(ds)))
    every_step = cfg.random_flip or not cfg.center_crop
    latent_cache = LatentCache(cfg.cache_dir, pipe.vae, memory=False)
    text_cache = TextEmbeddingCache(cfg.cache_dir, pipe, cfg.max_sequence_length, memory=False)

    def encode(i: int, with_latent: bool) -> dict:
        return encode_item(ds, i, text_cache, latent_cache if with_latent else None, cfg.center_crop)

    # Rank 0 fills the on-disk caches first; the other ranks then read them (hits).
    verbosity = dlog.get_verbosity()
    dlog.set_verbosity_error()  # encode_prompt warns per caption when T5 pads/truncates
    for turn in ([0, 1] if world > 1 else [0]):
        if (rank == 0) == (turn == 0):
            with torch.no_grad():
                items = [encode(i, not every_step) for i in train_index]
                val_items = [encode(i, True) for i in val_index]
        barrier()
    dlog.set_verbosity(verbosity)
    if rank == 0:
        report_evictions(latent_cache, text_cache)
        warn_long_captions(ds, pipe, cfg.max_sequence_length)

    sampler = BucketBatchSampler([ds.bucket_of(i) for i in train_index], cfg.batch_size, seed=cfg.seed, rank=rank,
                                 world_size=world, drop_last=True)
    workers = cfg.num_workers
    loader = torch.utils.data.DataLoader(
        CachedItems(items, base=ds if every_step else None, dataset_index=train_index),
        batch_sampler=EpochTagged(sampler), collate_fn=collate,
        num_workers=workers, pin_memory=cfg.pin_memory and device.type == "cuda",
        prefetch_factor=cfg.prefetch_factor if workers > 0 else None,
        persistent_workers=cfg.persistent_workers and workers > 0,
        worker_init_fn=worker_ignores_signals if workers > 0 else None,
        # Its own generator: each iter() draws a base seed, and from the global RNG that draw
        # would shift dropout masks whenever a resumed run re-creates the iterator.
        generator=torch.Generator().manual_seed(cfg.seed))
    return TrainData(Batches(loader, sampler), val_items, latent_cache if every_step else None, every_step,
                     {"latent": latent_cache.stats(), "text": text_cache.stats()})


def warn_long_captions(ds: ImageCaptionDataset, pipe, limit: int) -> None:
    """Say which captions the T5 encoder truncates at max_sequence_length (their tail is ignored)."""
    tok = getattr(pipe, "tokenizer_2", None)
    if tok is None:
        return
    long = [(Path(p).name, n) for p, cap in ds.records
            if (n := len(tok(cap, add_special_tokens=True)["input_ids"])) > limit]
    if long:
        shown = ", ".join(f"{printable(name)} ({n})" for name, n in long[:3]) + (" ..." if len(long) > 3 else "")
        warnings.warn(f"{len(long)} caption(s) are longer than max_sequence_length={limit} T5 tokens and will "
                      f"be truncated: {shown}; shorten them or raise max_sequence_length", stacklevel=3)


class Batches:
    """The training batches in order, crossing epochs, and where they stand: `epoch` and the
    batches `consumed` in it (what a checkpoint records, and what resuming restores)."""

    def __init__(self, loader: torch.utils.data.DataLoader, sampler: BucketBatchSampler):
        self.loader, self.sampler = loader, sampler
        self.epoch, self.consumed = 0, 0
        self._iter = None                      # the loader's iterator in the current epoch

    @property
    def position(self) -> tuple[int, int]:
        return self.epoch, self.consumed

    def next(self) -> dict:
        """The next batch from the bucketed loader, crossing epochs; advances (epoch, consumed)."""
        while True:
            if self._iter is None:
                self.sampler.set_epoch(self.epoch)
                self._iter = iter(self.loader)
            try:
                batch = next(self._iter)
            except StopIteration:
                self._iter = None
                self.epoch, self.consumed = self.epoch + 1, 0
                continue
            self.consumed += 1
            return batch

    def fetch(self, n: int) -> tuple[list[dict], float]:
        """The `n` micro-batches of one step and the seconds spent waiting for them."""
        t = time.perf_counter()
        micro = [self.next() for _ in range(n)]
        return micro, time.perf_counter() - t

    def seek(self, epoch: int, consumed: int) -> None:
        """Stand at (epoch, consumed) (resume, or rewinding a failed step before its checkpoint)."""
        self.epoch, self.consumed = epoch, consumed
        self.sampler.set_epoch(epoch)

    def state_dict(self, position: tuple[int, int]) -> dict:
        """The sampler's state at `position` (the loader may already serve batches past it)."""
        epoch, consumed = position
        return {**self.sampler.state_dict(consumed=consumed), "epoch": epoch}

    def close(self) -> None:
        """Stop the DataLoader workers now, through the loader's own sentinel shutdown. They ignore
        SIGTERM (see `worker_ignores_signals`), so they must not be left to the interpreter's exit,
        which terminates daemonic children with SIGTERM and would then wait for them forever."""
        for it in (self._iter, getattr(self.loader, "_iterator", None)):
            if it is not None and hasattr(it, "_shutdown_workers"):
                it._shutdown_workers()
        self._iter = None
        if hasattr(self.loader, "_iterator"):
            self.loader._iterator = None
