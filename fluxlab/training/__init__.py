"""FLUX LoRA training in parts; `fluxlab.trainer` is its public face.

    objective  the flow-matching loss, the per-step generators, the micro-batch inputs (pure functions)
    loader     the dataset, buckets, sampler, cached items and the DataLoader
    setup      process group, pipeline, quantization, adapter, attention, kernels, compile, optimizer
    state      output folder, checkpoint manager (save, find, resume, RNG, retention), adapter file
    observe    metrics, curves, summary, profiler, OOM report, non-finite guard
    signals    SIGINT/SIGTERM during a run
    trainer    `Trainer`: setup, step, next micro-batch, train
    run        `fluxlab train` / `fluxlab lr-find` from a config file
"""
