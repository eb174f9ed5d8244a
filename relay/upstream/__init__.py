"""The aiosmtplib side: the connection pool, the pipelined transaction and its wire form, OAuth2 tokens."""
