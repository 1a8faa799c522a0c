"""The error every layer of bnlab raises for a bad config value.

It lives apart from `bnlab.config` so that modules `bnlab.config` itself imports
to validate their sections (`bnlab.engine.distributed`) can raise it too.
"""


class ConfigError(ValueError):
  """A config key has a bad value; the message names the key and the fix."""
