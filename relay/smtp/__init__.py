"""The aiosmtpd side: the handler and protocol clients talk to, the DATA reader, client AUTH and accounts."""
