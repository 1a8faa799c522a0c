"""Signals: Ctrl-C held off while a checkpoint is written."""

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
