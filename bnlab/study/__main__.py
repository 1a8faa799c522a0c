"""`python -m bnlab.study`: the command line of `bnlab.study`."""

from bnlab import study

# absl's --help prints the main module's docstring: the package's usage.
__doc__ = study.__doc__  # pylint: disable=redefined-builtin

if __name__ == "__main__":
  study.run()
