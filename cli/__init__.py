"""The `kvmlx` command line (installed as the package kvmlx_cli so it cannot clash with another `cli`)."""
