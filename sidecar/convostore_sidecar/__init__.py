"""convostore sidecar: serves the session API on localhost for the agents of one pod."""
