"""The privacy-relay command line and its subcommands."""
