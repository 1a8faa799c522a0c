"""`python -m bnlab.sweep`: the command line of `bnlab.sweep`."""

from bnlab import sweep

# absl's --help prints the main module's docstring: the package's usage.
__doc__ = sweep.__doc__  # pylint: disable=redefined-builtin

if __name__ == "__main__":
  sweep.run()
