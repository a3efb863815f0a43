"""cogfun.common."""
