"""The `spotinference` command line: the dispatcher and the gateway's own subcommands."""
