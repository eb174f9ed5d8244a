"""From a stored message to the upstream: the delivery engine, direct (passthrough) sends, the outbox, bounces."""
