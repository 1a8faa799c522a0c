"""The networks bnlab's experiments train (`networks`) and the convolutions they use (`conv`)."""
