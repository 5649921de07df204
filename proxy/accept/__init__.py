"""Step 1 of a request: the listening socket, the accept loop and drain, one task per connection,
the client side of a connection (Downstream), and noticing clients that hang up."""
