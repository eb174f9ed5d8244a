"""Where accepted mail waits for the upstream: the SQLite spool."""
