"""The sidecar's HTTP layer: the only package that speaks HTTP to clients."""
