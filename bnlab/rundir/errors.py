"""What went wrong with a run's files, in one line that names the fix.

Every failure to read or write a work directory's files raises `WorkDirError`;
`io_error` turns an OS or library error into its words: what failed, why (the
OS's reason; a full disk recognized in any library's wording, since orbax and
tensorstore report it in their own), and what the user does next.
"""

from __future__ import annotations

import errno

from bnlab.errors import one_line


class WorkDirError(RuntimeError):
  """The work directory cannot be used; the message says why and what to do."""


_FULL_MARKERS = ("No space left", "ENOSPC", "RESOURCE_EXHAUSTED", "quota", "Disk quota",
                 "File too large", "os_error_code='28'", "os_error_code='27'",
                 "os_error_code='122'")


def is_storage_full(text: str) -> bool:
  """Whether an error's text says the disk (or quota, or file size limit) is full."""
  return any(t in text for t in _FULL_MARKERS)


def _storage_reason(e: BaseException) -> str:
  """A short reason for a failed write: the OS's words, not a library's whole message."""
  if getattr(e, "strerror", None):
    return e.strerror
  text = str(e)
  for marker, reason in (("No space left", "No space left on device"),
                         ("os_error_code='28'", "No space left on device"),
                         ("quota", "Disk quota exceeded"),
                         ("os_error_code='122'", "Disk quota exceeded"),
                         ("File too large", "File too large: the file size limit (ulimit -f)"),
                         ("os_error_code='27'", "File too large: the file size limit (ulimit -f)")):
    if marker in text:
      return reason
  return one_line(e)


def io_error(what: str, path: str, e: BaseException) -> WorkDirError:
  """A WorkDirError for a failed read/write of `path`, with the fix."""
  if getattr(e, "errno", None) == errno.ELOOP:  # O_NOFOLLOW met a link
    return link_error(path)
  reason = getattr(e, "strerror", None) or one_line(e)
  text = str(e)
  if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or is_storage_full(
      text):
    reason = _storage_reason(e)
    fix = "free space on that disk, then rerun the same command to resume"
  elif getattr(e, "errno", None) == errno.EISDIR:
    fix = ("a directory stands where bnlab keeps a file: move it aside, then rerun the same "
           "command to resume")
  elif getattr(e, "errno", None) == errno.ENOTDIR:
    fix = ("a file stands where bnlab keeps a directory: move it aside, then rerun the same "
           "command to resume")
  elif getattr(e, "errno", None) in (errno.EACCES, errno.EPERM, errno.EROFS):
    fix = "make it writable or choose another --workdir"
  else:
    fix = "check the disk and the path, then rerun the same command to resume"
  return WorkDirError(f"{what} {path} failed ({reason}); {fix}")


def link_error(path: str) -> WorkDirError:
  return WorkDirError(
      f"{path} is a symbolic link, and bnlab does not write through links; remove the link "
      "(what it points to is left alone), then rerun")
