"""One module per `prunecascade` command, each with `register(subparsers)`; listed in `service.cli.COMMANDS`."""
