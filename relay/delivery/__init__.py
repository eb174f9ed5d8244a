"""From a stored message to the upstream: intake, scheduler and retire (hybrid and queue
modes), direct sends (and passthrough), destinations (the outbox, an upstream), delivery reports kept as files,
and messages held for review (holding)."""
