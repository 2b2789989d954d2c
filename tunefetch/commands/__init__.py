"""One module per group of `tunefetch` verbs: each adds its parsers and handlers."""
