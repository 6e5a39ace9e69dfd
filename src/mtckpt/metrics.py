"""Counters, gauges and histograms in the Prometheus text format, and the HTTP endpoint
that serves them with liveness and readiness.

The trainer's manager (``mgr.metrics``) and the node daemon each keep a :class:`Metrics`;
both have the same families, so a dashboard reads either. Nothing here is global.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .errors import ChecksumMismatchError

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0)

Labels = tuple[tuple[str, str], ...]


def _labels(names: tuple[str, ...], given: dict[str, str]) -> Labels:
    if set(given) != set(names):
        raise ValueError(f"labels {sorted(given)} given, expected {sorted(names)}")
    return tuple((name, str(given[name])) for name in names)


def _format(name: str, labels: Labels, value: float) -> str:
    text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
    return f"{name}{{{text}}} {_number(value)}" if text else f"{name} {_number(value)}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if value != int(value) else str(int(value))


class _Family:
    kind = ""

    def __init__(self, name: str, help: str, labels: tuple[str, ...], lock: threading.Lock):
        self.name, self.help, self.label_names, self._lock = name, help, labels, lock

    def header(self) -> list[str]:
        name = f"{self.name}_total" if self.kind == "counter" else self.name  # as Prometheus's
        return [f"# HELP {name} {self.help}", f"# TYPE {name} {self.kind}"]


class Counter(_Family):
    kind = "counter"

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self._values: dict[Labels, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: a counter only goes up, got {amount}")
        key = _labels(self.label_names, labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def samples(self) -> list[tuple[str, Labels, float]]:
        return [(f"{self.name}_total", k, v) for k, v in sorted(self._values.items())]


class Gauge(_Family):
    """A value set by its owner, or read at collection time from ``read`` (a callable
    returning ``{label values: value}``, or a number for a gauge without labels)."""

    kind = "gauge"

    def __init__(self, *args, read: Callable[[], object] | None = None) -> None:
        super().__init__(*args)
        self._values: dict[Labels, float] = {}
        self.read = read

    def set(self, value: float, **labels: str) -> None:
        with self._lock:
            self._values[_labels(self.label_names, labels)] = float(value)

    def samples(self) -> list[tuple[str, Labels, float]]:
        values = dict(self._values)
        if self.read is not None:
            read = self.read()
            if not isinstance(read, dict):
                read = {(): read}
            for key, value in read.items():
                key = key if isinstance(key, tuple) else (key,)
                values[tuple(zip(self.label_names, map(str, key), strict=True))] = float(value)
        return [(self.name, k, v) for k, v in sorted(values.items())]


class Histogram(_Family):
    kind = "histogram"

    def __init__(self, *args, buckets: tuple[float, ...] = SECONDS_BUCKETS) -> None:
        super().__init__(*args)
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        self._series: dict[Labels, list[float]] = {}  # bucket counts, then sum and count

    def observe(self, value: float, **labels: str) -> None:
        key = _labels(self.label_names, labels)
        with self._lock:
            series = self._series.setdefault(key, [0.0] * (len(self.buckets) + 2))
            for index, bound in enumerate(self.buckets):
                if value <= bound:
                    series[index] += 1
            series[-2] += value
            series[-1] += 1

    def samples(self) -> list[tuple[str, Labels, float]]:
        out = []
        for key, series in sorted(self._series.items()):
            for bound, count in zip(self.buckets, series, strict=False):
                le = "+Inf" if math.isinf(bound) else repr(float(bound))
                out.append((f"{self.name}_bucket", key + (("le", le),), count))
            out.append((f"{self.name}_sum", key, series[-2]))
            out.append((f"{self.name}_count", key, series[-1]))
        return out


class Metrics:
    """The families both the trainer and the daemon report (``tier``: memory, local,
    peers, remote). The daemon adds its gauges with :meth:`gauge`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._families: list[_Family] = []
        self.save_seconds = self.histogram(
            "mtckpt_save_seconds",
            "Seconds from save() to each stage done: staged (the training thread's part), "
            "then each tier; the daemon: the push of one shard to a peer (stage=peers) and "
            "one upload (stage=remote).",
            ("stage",),
        )
        self.restore_seconds = self.histogram(
            "mtckpt_restore_seconds",
            "Seconds of one restore, by the tier it came from (the daemon: a recovery from peers).",
            ("tier",),
        )
        self.bytes_written = self.counter(
            "mtckpt_written_bytes", "Checkpoint bytes written to each tier.", ("tier",)
        )
        self.bytes_read = self.counter(
            "mtckpt_read_bytes", "Checkpoint bytes read from each tier by restores.", ("tier",)
        )
        self.checksum_failures = self.counter(
            "mtckpt_checksum_failures",
            "Copies found damaged by their crc32c (each is skipped and another copy used).",
            ("tier",),
        )
        self.saves_skipped = self.counter(
            "mtckpt_saves_skipped",
            "Steps not saved at all, by reason (memory budget: the node's memory tier had no "
            "room left for them).",
            ("reason",),
        )
        self.errors = self.counter(
            "mtckpt_errors",
            "Failed saves of a step to a tier (the step stays in faster tiers).",
            ("tier",),
        )

    def stage_done(self, size: int, stage: str, seconds: float, error, skipped: bool, *,
                   counted_by_daemon: tuple[str, ...] = ()) -> None:  # fmt: skip
        """A save's stage ended (a SaveHandle's on_finish): its seconds, or its error (a
        checksum mismatch: the memory copy changed while staged); the ``size`` bytes
        written, but for "staged" and the stages the node daemon counts itself."""
        if skipped:
            return
        if error is not None:
            self.errors.inc(tier=stage)
            if isinstance(error, ChecksumMismatchError):
                self.checksum_failures.inc(tier="memory")
            return
        self.save_seconds.observe(seconds, stage=stage)
        if stage != "staged" and stage not in counted_by_daemon:
            self.bytes_written.inc(size, tier=stage)

    def counter(self, name: str, help: str, labels: tuple[str, ...] = ()) -> Counter:
        return self._add(Counter(name, help, labels, self._lock))

    def gauge(self, name: str, help: str, labels: tuple[str, ...] = (), read=None) -> Gauge:
        return self._add(Gauge(name, help, labels, self._lock, read=read))

    def histogram(self, name: str, help: str, labels: tuple[str, ...] = ()) -> Histogram:
        return self._add(Histogram(name, help, labels, self._lock))

    def _add(self, family):
        if any(f.name == family.name for f in self._families):
            raise ValueError(f"metric {family.name} is defined twice")
        self._families.append(family)
        return family

    def samples(self) -> dict[str, float]:
        """Every sample by its Prometheus name and labels: ``'mtckpt_written_bytes_total{
        tier="local"}'`` -> 1.5e9."""
        out = {}
        for family in self._families:
            for name, labels, value in self._collect(family):
                out[_format(name, labels, value).rpartition(" ")[0]] = value
        return out

    def render(self) -> str:
        """The Prometheus text exposition (format 0.0.4)."""
        lines: list[str] = []
        for family in self._families:
            lines += family.header()
            lines += [_format(name, labels, value) for name, labels, value in
                      self._collect(family)]  # fmt: skip
        return "\n".join(lines) + "\n"

    def _collect(self, family) -> Iterable[tuple[str, Labels, float]]:
        if isinstance(family, Gauge) and family.read is not None:
            return family.samples()  # reads its owner's state: outside the lock
        with self._lock:
            return family.samples()


class Endpoint:
    """HTTP on ``address`` (HOST:PORT; port 0: any free one): ``/metrics``, ``/healthz``
    (200 while ``live()``), ``/readyz`` (200 while ``ready()``, else 503)."""

    def __init__(
        self,
        address: str,
        metrics: Metrics,
        live: Callable[[], bool] = lambda: True,
        ready: Callable[[], bool] = lambda: True,
    ) -> None:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"metrics address {address!r}: expected HOST:PORT")

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server name
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._reply(200, metrics.render(), CONTENT_TYPE)
                elif path in ("/healthz", "/livez"):
                    ok = live()
                    self._reply(200 if ok else 503, "ok\n" if ok else "not live\n")
                elif path == "/readyz":
                    ok = ready()
                    self._reply(200 if ok else 503, "ready\n" if ok else "not ready\n")
                else:
                    self._reply(404, "not found: try /metrics, /healthz or /readyz\n")

            def _reply(self, code: int, body: str, kind: str = "text/plain") -> None:
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:  # scrapes are not log lines
                pass

        self._server = ThreadingHTTPServer((host.strip("[]"), int(port)), Handler)
        self._server.daemon_threads = True
        self.address = f"{host}:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="mtckpt-metrics", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
