"""The node daemon: owns the memory tier beside the trainers, replicates committed shards to
peer daemons over gRPC and pulls them back after the loss of a node (``service``), and the
trainer's side of it (``link``). Nothing is imported here: a trainer's link does not load
the server."""
