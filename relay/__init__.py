"""privacy-relay: an SMTP relay that keeps recipients' addresses private."""

__version__ = "0.1.0"
