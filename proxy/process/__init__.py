"""One gateway process's life (services, signals, reload, drain) and `--workers N` (the supervisor
and its workers)."""
