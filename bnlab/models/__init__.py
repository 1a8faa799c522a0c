"""The networks bnlab's experiments train (`networks`), the convolutions they use (`conv`), and
your own model by name (`user`)."""
