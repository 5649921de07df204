"""Prometheus metrics (one scrape for every worker), structured JSON logs, the access line."""
