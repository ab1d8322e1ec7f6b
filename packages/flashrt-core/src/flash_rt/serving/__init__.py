"""Policy servers (openpi websocket protocol)."""
