"""cogfun.precompute."""
