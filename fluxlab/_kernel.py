"""The kernel manager papermill runs notebooks with: quiet at the source.

* IPC transport (Unix sockets in a private folder) instead of TCP on localhost: nothing is
  reachable from the network, and ipykernel has no reason to warn "Kernel is running over TCP
  without encryption" at every run.
* No SIGINT before a graceful shutdown: jupyter_client interrupts the kernel before asking it to
  shut down, which makes a kernel that finished every cell log "ERROR | KeyboardInterrupt caught
  in kernel". Interrupts at any other time (a cell timeout) go through unchanged.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from jupyter_client.manager import AsyncKernelManager
from traitlets import default


class QuietKernelManager(AsyncKernelManager):
    _ipc_dir: str | None = None  # the private socket folder, made when the ip is first asked for

    @default("transport")
    def _default_transport(self) -> str:
        return "ipc"

    @default("ip")
    def _default_ip(self) -> str:
        # The socket files' prefix: a private folder (0700), never the working directory.
        self._ipc_dir = tempfile.mkdtemp(prefix="fluxlab-kernel-")
        return os.path.join(self._ipc_dir, "ipc")

    async def _async_interrupt_kernel(self) -> None:
        if getattr(self, "shutting_down", False):  # a graceful shutdown request follows; the kernel is idle
            return
        await super()._async_interrupt_kernel()

    def cleanup_ipc_files(self) -> None:
        super().cleanup_ipc_files()
        if self._ipc_dir:
            shutil.rmtree(self._ipc_dir, ignore_errors=True)
