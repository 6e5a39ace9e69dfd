"""The planner tests' inputs: the cluster harness's example (version 1), 4 nodes and a
node lost every 2 minutes."""

HARNESS = {
    "version": 1, "step_seconds": 0.5, "nodes": 4, "state_bytes_per_node": 33554432,
    "restart_seconds": 12.0,
    "failures_per_hour": {"node": 30.0, "trainer": 0.0, "two-nodes": 0.0},
    "peer_losses_tolerated": 1,
    "tiers": {
        "memory": {"every": 1, "stall_seconds": 0.01, "durable_seconds": 0.02,
                   "restore_seconds": 0.2},
        "peers": {"every": 1, "stall_seconds": 0.0, "durable_seconds": 0.3,
                  "restore_seconds": 1.5},
        "local": {"every": 10, "stall_seconds": 0.0, "durable_seconds": 1.0,
                  "restore_seconds": 1.0},
        "remote": {"every": 20, "stall_seconds": 0.0, "durable_seconds": 4.0,
                   "restore_seconds": 5.0},
    },
}  # fmt: skip
