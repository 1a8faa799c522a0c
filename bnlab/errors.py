"""The error every layer of bnlab raises for a bad config value.

It lives apart from `bnlab.config` so that modules `bnlab.config` itself imports
to validate their sections (`bnlab.engine.distributed`) can raise it too.
"""


class ConfigError(ValueError):
  """A config key has a bad value; the message names the key and the fix."""


class UnusableModelError(ConfigError):
  """`config.model.name`'s model fails when run as the config runs it: at init or apply, in
  train or eval mode, in its gradient, or out of memory. The message names the model and
  what failed. A ConfigError, so a command ends with one line; a sweep records the member
  failed and trains the others, since another member's batch size or model may work."""


def one_line(e: BaseException, limit: int = 200) -> str:
  """An exception's message on one line, at most `limit` characters (libraries' messages
  span several, and an error line names the fix after it), or its type's name."""
  return " ".join(str(e).split())[:limit] or type(e).__name__
