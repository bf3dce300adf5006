"""The gRPC edge: wire conversion, the error table, servicers, and the server app and CLI."""
