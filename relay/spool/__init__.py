"""Where accepted mail waits for the upstream: the Spool interface (interface.py) and its SQLite implementation,
with the history, held messages and totals the console reads (history.py)."""
