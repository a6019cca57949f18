"""The `convostore` command: it starts the sidecar and the operator, and works on a running
sidecar's sessions and keys. It sits above the three components, the one package that
may import them all."""
