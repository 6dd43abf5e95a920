"""The router worker: consumes jobs, routes them to upstreams, replies, dead-letters."""
