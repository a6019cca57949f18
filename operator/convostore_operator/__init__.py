"""convostore operator: ConversationStore objects become configured sidecars.

A platform team declares stores; the operator validates each, renders the sidecar's
configuration into a Secret, creates what the store needs (encryption keys, a Dapr
Component, a PostgreSQL schema), reports status and Events, and injects the sidecar into
pods that ask for it. Run it as `convostore operator`.
"""
