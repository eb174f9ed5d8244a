"""Where accepted mail waits for the upstream: the Spool interface (interface.py) and its SQLite implementation."""
