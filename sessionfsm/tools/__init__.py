"""Tools around the library: command-line commands, never imported by the core."""
