"""Sans-I/O HTTP/1.1, both directions: the strict request reader, the upstream response reader, and
the one chunked decoder they share. No sockets here."""
