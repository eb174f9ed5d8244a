"""The pure core: the message, its addresses and content, the policy, the rewrite and line lengths, the leak check,
the sender checks, the replies, the DSN, the rules for routing, pacing and retrying, and what the console keeps of
a message (activity) and shows of one not sent (preview).

Bytes and plain data in, plain data out: no sockets, files, clocks, event loop or configuration library
(pyproject.toml's import-linter contract holds it to that).
"""
