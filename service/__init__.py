"""The HTTP service, its settings and the `prunecascade` command line: the only layer that knows all others."""
