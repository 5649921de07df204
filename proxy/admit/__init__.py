"""Step 2: the route table, API keys and authentication, the narrow validation of request bodies,
and the endpoints the gateway answers itself."""
