"""The pure core: a message, its addresses and content, the policy, the rewrite, the leak check, the replies.

Bytes and plain data in, plain data out: no sockets, files, clocks, event loop or configuration library
(pyproject.toml's import-linter contract holds it to that).
"""
