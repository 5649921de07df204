"""Step 6: the upstream's response to the client, byte for byte, and the in-band error of a stream
that fails after its head was sent."""
