"""Library log filters: a run's progress log without checkpointing's chatter.

orbax and etils log INFO lines at every checkpoint (jax some at start-up), and
after a failed write (a full disk) orbax, tensorstore, asyncio and tensorboardX
each print tracebacks of it from their threads; bnlab reports that failure in
one line (`bnlab.rundir.errors`), so these filters drop the echoes.
`--verbosity=1` (debug) shows everything.
"""

from __future__ import annotations

import errno
import sys

from absl import logging

from bnlab.rundir.errors import is_storage_full


class _QuietLibraries:
  """Drops the INFO chatter (below Python logging.WARNING = 30) of checkpointing."""

  noisy = ("/orbax/", "/etils/", "jax/_src/xla_bridge.py")

  def filter(self, record) -> bool:
    path = record.pathname.replace("\\", "/")
    if not any(n in path for n in self.noisy):
      return True
    if record.levelno < 30:
      return False
    # A failed checkpoint write (full disk, file size limit) is reported by
    # bnlab in one line; orbax's tracebacks of it from each of its threads are not shown.
    text = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
      text += f" {record.exc_info[1]}"
    return not is_storage_full(text)


class _QuietAsyncio:
  """Drops asyncio's "exception was never retrieved" of a failed checkpoint write."""

  def filter(self, record) -> bool:
    text = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
      text += f" {record.exc_info[1]}"
    return not is_storage_full(text)


def _after_a_failed_write(exc) -> bool:
  """Whether `exc` is the echo, in a library's thread, of a write bnlab reports itself.

  After a checkpoint or event file write fails (a full disk), the threads of
  orbax/tensorstore and tensorboardX still finishing print tracebacks of it
  ("Event loop is closed", the writer's flush at exit); bnlab's `error:` line
  says what happened and what to do.
  """
  if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
    return True
  return isinstance(exc, OSError) and (
      getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
      or str(exc) == "handle is closed")


def quiet_library_logs() -> None:
  """Keeps the progress log readable (unless --verbosity asks for debug output)."""
  if logging.get_verbosity() < logging.DEBUG:
    for where in (logging.get_absl_handler(), logging.get_absl_logger()):
      if not any(isinstance(f, _QuietLibraries) for f in where.filters):
        where.addFilter(_QuietLibraries())
    import logging as py_logging  # pylint: disable=g-import-not-at-top
    asyncio_logger = py_logging.getLogger("asyncio")
    if not any(isinstance(f, _QuietAsyncio) for f in asyncio_logger.filters):
      asyncio_logger.addFilter(_QuietAsyncio())
    if not getattr(sys.excepthook, "bnlab_quiet", False):
      import threading  # pylint: disable=g-import-not-at-top
      hooks = (sys.excepthook, sys.unraisablehook, threading.excepthook)

      def excepthook(kind, value, tb):  # tensorstore's callbacks print through it
        if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
          hooks[0](kind, value, tb)

      def unraisablehook(info):
        if not _after_a_failed_write(info.exc_value):
          hooks[1](info)

      def thread_excepthook(args):
        if not _after_a_failed_write(args.exc_value):
          hooks[2](args)
      excepthook.bnlab_quiet = True
      sys.excepthook, sys.unraisablehook = excepthook, unraisablehook
      threading.excepthook = thread_excepthook
