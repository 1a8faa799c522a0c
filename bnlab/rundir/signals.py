"""Signals: Ctrl-C held off while a checkpoint is written; SIGTERM, SIGUSR1 and SIGHUP stop a run
at a step boundary with a checkpoint.

SIGTERM is what SLURM, Kubernetes and cloud preemption send before they kill a
job (SIGKILL follows after a grace period); SIGUSR1 is what SLURM sends ahead
of a job's time limit when asked (`--signal=USR1@SECONDS`); SIGHUP, what a closed
terminal or ssh session sends. Python's default for each is to die on the spot,
losing everything since the last periodic
checkpoint. While `stop_signals_caught` holds, either one only sets a flag:
the step loop (`bnlab.engine.loop`) looks at it at every step boundary (after
the step, or the scanned chunk of steps, in progress), writes a checkpoint
there (the train state and the metric sums, as a periodic one), and raises
`Preempted`; the command-line programs end with one line naming the command
that resumes and exit status 128 + the signal's number (143 for SIGTERM, 138
for SIGUSR1, 129 for SIGHUP; a program started under nohup ignores SIGHUP, and so
does bnlab then). A second signal while that checkpoint is written is held like
the first, so it cannot cut the write short.
"""

from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def interrupts_deferred():
  """Ctrl-C (SIGINT) held until the block ends, then raised (main thread only).

  An orbax save interrupted midway leaves its threads waiting on each other
  (for minutes, with tracebacks) before the process can exit; a checkpoint
  finishes in moments, so Ctrl-C stops the run just after it instead.
  """
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  caught = []
  previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)
    if caught:
      raise KeyboardInterrupt


# The signals that stop a run at its next step boundary, with a checkpoint.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)


class Preempted(KeyboardInterrupt):
  """A run (or sweep) stopped by SIGTERM or SIGUSR1, its work up to `step` checkpointed.

  A KeyboardInterrupt, so that what lets Ctrl-C through (a sweep's members'
  error handling, cleanup) lets it through too. `step`: where the run stopped
  and its checkpoint is (None: stopped between runs, or after the run ended;
  0: before it trained a step). `exit_status`: 128 + the signal's number, as
  a shell reports a process the signal ended.
  """

  def __init__(self, signum: int, step: int | None = None):
    super().__init__(signum, step)
    self.signum, self.step = signum, step

  @property
  def signal_name(self) -> str:
    return signal.Signals(self.signum).name

  @property
  def exit_status(self) -> int:
    return 128 + self.signum

  @property
  def what(self) -> str:
    """What happened and what was kept, without the fix."""
    if self.step is None:
      return f"{self.signal_name} as the run in progress finished; stopped there (nothing lost)"
    if self.step == 0:
      return f"{self.signal_name} before the first step (nothing to save)"
    return f"{self.signal_name} at step {self.step}, checkpointed there (nothing lost)"

  def __str__(self) -> str:
    return f"{self.what}; rerun the same command to resume"


_pending: list[int] = []  # the signals received while caught, oldest first
_depth = 0  # nesting of stop_signals_caught (a sweep's, then each run's)


def _record(signum, frame) -> None:  # pylint: disable=unused-argument
  # Only a note: the loop acts on it at the next step boundary (nothing here may
  # interrupt a checkpoint write, or log from inside an interrupted write).
  _pending.append(signum)


def stop_requested() -> int | None:
  """The first stop signal received while caught and not yet acted on, or None."""
  return _pending[0] if _pending else None


def raise_if_stop_requested(step: int | None = None) -> None:
  """Raises `Preempted` at `step` when a stop signal was received."""
  signum = stop_requested()
  if signum is not None:
    raise Preempted(signum, step)


@contextlib.contextmanager
def stop_signals_caught():
  """SIGTERM and SIGUSR1 noted (`stop_requested`) while the block runs, not fatal.

  Installed in the main thread only (Python runs handlers there; elsewhere
  the block runs with the handlers as they are), and not for a signal the
  process ignores (SIG_IGN, set by whoever started it). On leaving, the previous
  handlers are put back, so a program that calls bnlab keeps its own (one set
  outside Python, e.g. jax.distributed's SIGTERM notifier, cannot be: Python's
  default comes back in its place). Blocks
  nest (a sweep's holds each run's): a signal noted in an inner block stays
  noted for the outer one. When the outermost block ends without an exception
  but a signal was noted (it came after the loop's last look, e.g. during
  the final evaluation, or between a sweep's runs), it raises `Preempted`
  (step None): the work is complete or checkpointed, and the process stops
  rather than go on to more.
  """
  global _depth
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  outermost = _depth == 0
  if outermost:
    del _pending[:]
  previous = {}
  try:
    for signum in STOP_SIGNALS:
      if signal.getsignal(signum) is not signal.SIG_IGN:  # ignored on purpose: stays so
        previous[signum] = signal.signal(signum, _record)
    _depth += 1
    try:
      yield
    finally:
      _depth -= 1
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
    if outermost:
      pending = stop_requested()
      del _pending[:]
  if outermost and pending is not None:
    raise Preempted(pending)
