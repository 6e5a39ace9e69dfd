"""A long-polled Status: the trainer waits in one call for the daemon's replication or
flush state to change instead of asking over and over (real daemon processes, and one
in-process daemon over its Unix socket for the limit on waiting calls)."""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

from daemons import save
from mtckpt.daemon.rpc import Client
from mtckpt.daemon.service import FREE_WORKERS, Daemon, DaemonConfig

RUN = "exp"


def in_thread(call):
    """Run ``call`` in a thread; a function returning its result once it is done (None if
    it is not done yet)."""
    out: list = []
    thread = threading.Thread(target=lambda: out.append(call()), daemon=True)
    thread.start()
    return lambda timeout: (thread.join(timeout), out[0] if out else None)[1]


def test_a_waiting_status_answers_when_replication_changes_and_not_before(cluster):
    daemons = cluster(["wait-a", "wait-b"])
    a = daemons["wait-a"]
    with a.client() as client:
        first = client.status()
        assert first.version != 0 and not first.replication
        started = time.monotonic()
        quiet = client.status(changed_since=first.version, wait=1.5)
        assert time.monotonic() - started >= 1.4  # nothing changed: it waited it out
        assert quiet.version == first.version
        assert client.status(changed_since=first.version + 1, wait=30).version == first.version

        waiting = in_thread(lambda: client.status(changed_since=first.version, wait=60))
        time.sleep(0.5)
        assert waiting(0) is None  # still waiting
        save(a, 0, 2, [1])
        changed = waiting(30)
        assert changed is not None, "the waiting Status did not answer the change"
        assert changed.version != first.version
        assert [r.shard.step for r in changed.replication] == [1]

        # Following it change by change ends with the shard stored on its target.
        version, answers = changed.version, 1
        while not all(set(r.targets) <= set(r.stored) for r in changed.replication):
            changed = client.status(changed_since=version, wait=30)
            assert changed.version != version, "a long poll ran out while replication went on"
            version, answers = changed.version, answers + 1
        assert changed.replication[0].stored == ["wait-b"] and answers <= 5


def test_waiting_calls_beyond_the_free_threads_answer_at_once_and_stop_wakes_them():
    root = Path(tempfile.mkdtemp(prefix="mtw-"))
    config = DaemonConfig(node_id="solo", memory_root=str(root / "memory"), listen=None,
                          socket=str(root / "d.sock"), workers=FREE_WORKERS + 1)  # fmt: skip
    daemon = Daemon(config)
    daemon.start()
    stopped = False
    try:
        with Client(f"unix://{root / 'd.sock'}") as one, Client(f"unix://{root / 'd.sock'}") as two:
            version = one.status().version
            waiting = in_thread(lambda: one.status(changed_since=version, wait=60))
            time.sleep(0.5)
            assert waiting(0) is None  # holds the only waiting slot
            started = time.monotonic()
            assert two.status(changed_since=version, wait=60).version == version
            assert time.monotonic() - started < 10  # no slot: answered at once, not in 60 s
            daemon.stop(drain=False)
            stopped = True
            assert waiting(10) is not None, "stopping the daemon left a Status call waiting"
    finally:
        if not stopped:
            daemon.stop(drain=False)
