"""The `hearth` command line: `cli.main` registers every subcommand in one list."""
