"""FLUX LoRA training: the public names of fluxlab/training/ (one module per part).

    fluxlab train configs/tiny.yaml [--set key=value ...] [--resume latest|DIR] [--profile N]
    fluxlab lr-find configs/tiny.yaml

Python API
----------
    trainer = Trainer(cfg)                   # cfg: fluxlab.config.TrainConfig
    trainer.setup()                          # data, caches, model + adapter, optimizer, resume
    result = trainer.train()                 # TrainResult(final_loss, losses, lora_path, ...)

Timing one step in isolation (benchmarks/train.py): no dataset, no caches, random inputs of
the model's real shapes:

    trainer = Trainer(cfg); trainer.setup(with_data=False)
    batch = trainer.random_batch(batch_size=1, resolution=1024)
    out = trainer.step([batch])              # dict(loss, lr, grad_norm): one optimizer step
    # `step` takes a list of micro-batches (len == gradient_accumulation); each is a dict of
    # mean/logvar [B, 16, H/8, W/8] (VAE latent distribution), prompt_embeds [B, S, D],
    # pooled [B, Dp]. Tensors may be on the CPU or the device. Nothing is synchronised except
    # what the math needs; call torch.cuda.synchronize() around it when timing.

The objective is flow matching as diffusers' examples/dreambooth/train_dreambooth_lora_flux.py
computes it (see `flow_matching_loss`), reusing diffusers' own helpers.

Randomness: every random draw of a step (latent sample, noise, timesteps) comes from a CPU
generator seeded by (seed, step, micro-batch, rank), so a resumed run draws exactly what the
uninterrupted one would. The global RNG (LoRA dropout) is checkpointed per rank.

Exit codes of `fluxlab train`: 0 done; 2 bad config, data, checkpoint or output folder (one line
naming the field or file); 3 CUDA out of memory (message has the step, memory and hints); 4 the
loss or gradient became non-finite (message names the step and cause; nothing written after it);
130 / 143 stopped by SIGINT / SIGTERM (128 + the signal): a signal during the loop finishes the
step and writes a checkpoint first, one during start-up stops at once, one during the final save
lets that save finish. A second signal aborts at once (every file is still whole: writes are atomic).

Output folders, checkpoints and the adapter file: fluxlab/training/state.py.
"""

from __future__ import annotations

from fluxlab.training.objective import (VALIDATION_STREAM, draw_step_inputs, flow_matching_loss,
                                        step_generator)
from fluxlab.training.observe import TrainingDiverged, TrainingOOM, TrainResult
from fluxlab.training.run import (EXIT_NONFINITE, EXIT_OOM, LR_FIND_MAX_FACTOR, LRFindResult,
                                  cli_lr_find, cli_train, lr_find, step_source, suggest_lr)
from fluxlab.training.signals import RunInterrupted
from fluxlab.training.state import (LORA_FILE, RUN_MARKER, RUN_OUTPUTS, check_output_dir,
                                    claim_output_dir)
from fluxlab.training.trainer import Trainer

__all__ = ["Trainer", "TrainResult", "TrainingOOM", "TrainingDiverged", "RunInterrupted", "LORA_FILE", "RUN_MARKER",
           "RUN_OUTPUTS", "check_output_dir", "claim_output_dir", "flow_matching_loss", "step_generator",
           "draw_step_inputs", "VALIDATION_STREAM", "lr_find", "suggest_lr", "LRFindResult", "LR_FIND_MAX_FACTOR",
           "cli_train", "cli_lr_find", "EXIT_OOM", "EXIT_NONFINITE", "step_source"]
