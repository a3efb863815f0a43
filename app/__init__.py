"""cogfun's app layer: the CLI and the demo, where the two stages meet."""
