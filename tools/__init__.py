"""The `tokenbus` command line: cluster launcher, admin commands, benchmark."""
