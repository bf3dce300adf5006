"""The typed Python client, the offline (file) runner, and the `nextchar` command line."""
