"""What this process runs on: package versions, device, driver, Triton mode.

`environment()` is cheap on purpose: `store.provenance()` calls it for every record. Versions come
from package metadata (no imports); the device is read from torch only if torch is already imported,
because importing torch just to label a record would cost seconds. `doctor()` imports torch.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import shutil
import socket
import subprocess
import sys

# The packages whose versions decide how a measurement came out (docs/ARCHITECTURE.md, "Records").
PACKAGES = ("torch", "triton", "diffusers", "peft", "transformers", "papermill", "nbval")


def package_version(name: str) -> str | None:
    """The installed version of `name`, or None when it is not installed (the GPU box lacks some)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def _nvidia_smi() -> list[tuple[str, str]]:
    """[(GPU name, driver version)] from nvidia-smi (torch does not expose the driver); [] without a GPU."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    if out.returncode != 0:
        return []
    return [tuple(part.strip() for part in line.rsplit(",", 1)) for line in out.stdout.strip().splitlines() if "," in line]


def _driver() -> str | None:
    gpus = _nvidia_smi()
    return gpus[0][1] if gpus else None


def triton_mode() -> str:
    """'interpreted' when TRITON_INTERPRET=1 (CPU test runs), else 'compiled'."""
    return "interpreted" if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else "compiled"


def _device_info(torch, init: bool) -> dict:
    """Device fields from torch. Without `init`, a process that has not touched CUDA yet is not
    made to (that costs a context, ~0.5 s and GPU memory): the name then comes from nvidia-smi."""
    if torch.cuda.is_available():
        if init or torch.cuda.is_initialized():
            idx = torch.cuda.current_device()
            return {"device": f"cuda:{idx}", "device_name": torch.cuda.get_device_name(idx),
                    "cuda": torch.version.cuda, "driver": _driver()}
        gpus = _nvidia_smi()
        return {"device": "cuda", "device_name": gpus[0][0] if gpus else "unknown GPU",
                "cuda": torch.version.cuda, "driver": _driver()}
    return {"device": "cpu", "device_name": platform.processor() or platform.machine() or "cpu",
            "cuda": torch.version.cuda, "driver": _driver()}


def environment(import_torch: bool = False) -> dict:
    """Versions, host, device, driver and Triton mode as one flat dict.

    The device fields come from torch when it is already imported (or `import_torch=True`);
    otherwise they say 'unknown' rather than pay for the import.
    """
    env = {"python": platform.python_version(), "host": socket.gethostname(),
           "platform": platform.platform(), "triton_mode": triton_mode()}
    env.update({name: package_version(name) for name in PACKAGES})
    torch = sys.modules.get("torch")
    if torch is None and import_torch:
        import torch  # noqa: PLC0415 - deliberate: only doctor() pays for it
    if torch is not None:
        env.update(_device_info(torch, init=import_torch))
        if env["device"] == "cpu" and env["triton_mode"] == "compiled":
            env["triton_mode"] = "unavailable (no GPU; TRITON_INTERPRET=1 runs kernels interpreted)"
    else:
        env.update({"device": "unknown", "device_name": "unknown", "cuda": None, "driver": _driver()})
    return env


def doctor() -> int:
    """Print the environment for a bug report; non-zero when torch itself is missing."""
    try:
        env = environment(import_torch=True)
    except ImportError as e:
        print(f"torch is not importable ({e}); run `make setup`", file=sys.stderr)
        return 1
    width = max(len(k) for k in env)
    for key, value in env.items():
        print(f"{key:<{width}}  {value if value is not None else 'not installed / n.a.'}")
    if env["triton_mode"] == "interpreted":
        print("note: TRITON_INTERPRET=1 - Triton kernels run in the (slow) interpreter; timings are meaningless")
    return 0


# --- the default device and dtype (torch imported only when asked) ------------------------------
def default_device() -> str:
    """cuda when a GPU is usable, else cpu."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device):
    """A torch.dtype: fp32 on the CPU (bf16 matmuls there are slow and lossy), bf16 where the GPU supports it."""
    import torch

    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32
