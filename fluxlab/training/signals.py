"""SIGINT/SIGTERM during a run: start-up stops at once, the loop finishes the step and writes a
checkpoint, the final save runs to its end, and a second signal aborts at once. Only the main
process reacts: forked DataLoader workers inherit the handler and must stay silent."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading


class RunInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped start-up, or a second signal aborted a run; `signum` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class RunSignals:
    """Where the run is (`phase`: idle, forward, backward, optimizer, final save) and which signal
    asked it to stop (`stop_signal`, `stop_requested`; `aborted_during` after an abort)."""

    def __init__(self, rank: int = 0):
        self.rank = rank
        self.phase = "idle"
        self.mode = "abort"                    # abort: raise at once; finish: end the step, then stop
        self.stop_requested = False
        self.stop_signal: int | None = None
        self.aborted_during: str | None = None
        self._main_pid = os.getpid()

    def _handler(self, signum, frame):
        if os.getpid() != self._main_pid:
            return  # a DataLoader worker: the main process decides and speaks
        if self.mode == "abort" or self.stop_requested:
            self.aborted_during = "start-up" if self.mode == "abort" else self.phase
            raise RunInterrupted(signum)
        self.stop_requested, self.stop_signal = True, signum
        if self.rank == 0:
            doing = ("letting the final save finish" if self.phase == "final save" else
                     "finishing the step in progress, then writing a checkpoint")
            print(f"\nfluxlab: {signal.Signals(signum).name} received: {doing} "
                  f"(a second signal aborts at once)", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def handling(self, mode: str):
        """Handle SIGINT/SIGTERM for a block. mode "abort": raise RunInterrupted at once (start-up
        has nothing to save). mode "finish": note the signal; the loop ends the step, checkpoints and
        stops, and the final save runs to its end."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old_mode, self.mode = self.mode, mode
        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in old:
            signal.signal(s, self._handler)
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            self.mode = old_mode
