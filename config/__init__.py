"""cogfun.config."""
