"""cogfun.train."""
