"""`fluxlab generate`: one image, optionally with a trained LoRA."""

from __future__ import annotations

from fluxlab.commands import UserError


def add(sub) -> None:
    p = sub.add_parser("generate", help="generate one image with a pipeline (tiny by default)")
    p.add_argument("--model", default="tiny", help="a preset name or a diffusers FLUX directory")
    p.add_argument("--prompt", default="a red circle on a white background")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--max-sequence-length", type=int, default=512, help="T5 tokens of the prompt (1..512)")
    p.add_argument("--lora", default=None, metavar="PATH",
                   help="a LoRA .safetensors file or a training output_dir (loaded with load_lora_weights)")
    p.add_argument("--lora-scale", type=float, default=1.0, metavar="S",
                   help="multiplies the LoRA's trained strength (1: as trained, 0: the base model)")
    p.add_argument("--out", default="runs/generate.png")
    p.set_defaults(func=run)


def run(a) -> int:
    import io

    from fluxlab._atomic import atomic_write_bytes
    from fluxlab.inference import InferenceSession, generate_flux2, lora_file, to_pil
    from fluxlab.models import family_of

    if a.lora_scale != 1.0 and not a.lora:
        raise UserError("--lora-scale needs --lora PATH (the LoRA to scale)")
    if family_of(a.model) == "flux2":
        lora = lora_file(a.lora) if a.lora else None  # a bad path fails here, before any model loads
        image = generate_flux2(a.model, a.prompt, a.seed, device=a.device, steps=a.steps, size=a.size,
                               max_sequence_length=a.max_sequence_length, lora=lora, lora_scale=a.lora_scale)
    else:
        session = InferenceSession(a.model, a.device, steps=a.steps, size=a.size,
                                   max_sequence_length=a.max_sequence_length, lora=a.lora, lora_scale=a.lora_scale)
        image, _ = session.generate(a.prompt, a.seed)  # [3, size, size] in [0, 1]
        lora = session.lora
    buf = io.BytesIO()
    to_pil(image).save(buf, format="PNG")
    path = atomic_write_bytes(a.out, buf.getvalue())
    print(f"image written to {path}" + (f" (LoRA {lora} at scale {a.lora_scale:g})" if a.lora else ""))
    return 0
