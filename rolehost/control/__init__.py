"""Control: the API on the run directory's Unix socket, and the exit codes of the
command (the client, a public module, is `rolehost.client`)."""
