"""Step 7: vLLM's own token counts read from the relayed bytes, the usage row of each billed request,
and the SQLite usage log (batched off the hot path, spilled when the database is unwritable)."""
