"""Step 3: per-key requests- and tokens-per-minute buckets (in process, or one table shared by all
workers), charged up front and settled with vLLM's counts."""
