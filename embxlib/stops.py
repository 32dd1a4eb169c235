"""Stopping a run from outside. The trainer: a stop signal (SIGINT, SIGTERM, SIGHUP) or the loss of its parents
(torchrun, the launcher) ends training as Ctrl-C does, and the record says which (Stops). The launcher: SIGTERM
and SIGHUP interrupt it as Ctrl-C does (signals_interrupt), and it ends its torchrun's process tree (kill_tree)."""
from __future__ import annotations

import _thread
import contextlib
import os
import signal
import subprocess
import threading
import time

from .runfolder import STOP_SIGNALS, process_alive


class StopSignal(KeyboardInterrupt):
    """A stop signal arrived: training ends as after Ctrl-C, the summary says `stopped` and names the signal."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


class Stops:
    """The trainer's stop state: the signals received (first first), why training was interrupted (the summary's
    error), whether a signal raises StopSignal now (armed; not while the run's record is being written), and the
    watchdog's own interrupt, which is not a signal from outside."""

    def __init__(self):
        self.signals: list[int] = []
        self.reasons: list[str] = []
        self.armed = False
        self.from_watchdog = False

    @property
    def signal(self) -> int | None:
        """The first stop signal this process received (while handling() was on), or None."""
        return self.signals[0] if self.signals else None

    @property
    def reason(self) -> str | None:
        return self.reasons[0] if self.reasons else None

    def by_signal(self) -> bool:
        """A stop from outside is what happened (also when it surfaced as another error: torch.save reports an
        interrupted write as "unexpected pos")."""
        return bool(self.reasons) and self.reasons[0].startswith("stopped by SIG")

    def raise_if_stopped(self) -> None:
        """A signal that came while nothing raised it (the folder being set up)."""
        if self.signal is not None:
            raise StopSignal(self.signal)

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.from_watchdog:
            self.from_watchdog = False
        else:
            self.signals.append(signum)
            self.reasons.append(f"stopped by {signal.Signals(signum).name}")
        if self.armed:
            self.armed = False  # one interruption: a second signal must not tear the record being written
            raise StopSignal(signum)

    @contextlib.contextmanager
    def handling(self):
        """SIGINT, SIGTERM and SIGHUP raise StopSignal in the main thread (a Python handler runs between bytecodes,
        so also inside torch.save's writes and between the ops of a step); a signal that is ignored (nohup's SIGHUP,
        a background job's SIGINT) stays ignored. The previous handlers come back afterwards."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {}
        for name in STOP_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:
                previous[sig] = signal.signal(sig, self._on_signal)
        self.signals.clear()
        self.reasons.clear()
        self.armed = True
        try:
            yield self
        finally:
            self.armed = False
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def with_parents(self, poll_s: float = 0.5, grace_s: float = 10.0) -> None:
        """Under torchrun or our launcher, stop when they are gone: a SIGKILLed launcher cannot stop its children,
        and a trainer left behind keeps training a folder that a rerun would then train twice. A plain `python -m
        embxlib.train` is not watched: nohup must keep it running when its shell goes."""
        torchrun = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None
        launcher = int(os.environ["EMBXLIB_LAUNCHER_PID"]) if os.environ.get("EMBXLIB_LAUNCHER_PID") else None
        if torchrun is None and launcher is None:
            return

        def watch():
            while True:
                time.sleep(poll_s)
                if torchrun is not None and os.getppid() != torchrun:
                    self.reasons.append(f"stopped: torchrun (pid {torchrun}) is gone")
                elif launcher is not None and not process_alive(launcher):
                    self.reasons.append(f"stopped: the launcher (pid {launcher}) is gone")
                else:
                    continue
                self.from_watchdog = True
                _thread.interrupt_main()  # a KeyboardInterrupt in the training loop: the summary and log say why
                time.sleep(grace_s)  # stuck in a collective whose peers are gone: leave without cleaning up
                os._exit(1)

        threading.Thread(target=watch, name="stop-with-parents", daemon=True).start()


@contextlib.contextmanager
def signals_interrupt():
    """SIGTERM and SIGHUP raise KeyboardInterrupt here (main thread only; an ignored signal stays ignored), so a
    launcher stopped by kill, Slurm or a closed terminal stops its torchrun tree (which records it) and releases
    its locks, instead of vanishing and leaving the trainers to notice."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, interrupt)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def kill_tree(proc: subprocess.Popen) -> None:
    """End a process started in its own session and everything under it: SIGTERM, then SIGKILL after 10 s."""
    if proc.poll() is not None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # grandchildren of a finished torchrun, if any
        except (ProcessLookupError, PermissionError):
            pass
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue
