"""The privacy-relay benchmark: the relay and a private Postfix against one sink, in one run (python -m bench)."""
