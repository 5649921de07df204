"""Step 5: the keep-alive pool, one upstream connection, the request head an upstream gets, and the
retry rule (only before the first response byte)."""
