"""Real daemon processes on loopback ports, each with its own roots, for the daemon tests."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np

from mtckpt import CheckpointManager, LocalTier, MemoryTier, PeerTier
from mtckpt.daemon.rpc import Client
from ports import free_port  # noqa: F401 (the daemon tests import it from here)

TRAIN_RUN = "exp"


class DaemonProcess:
    def __init__(self, node_id: str, base: Path, sockets: Path, port: int, peers: list[str],
                 extra: list[str], host: str = "127.0.0.1") -> None:  # fmt: skip
        self.node_id = node_id
        self.memory_root = base / node_id / "memory"
        self.local_root = base / node_id / "local"  # used with --local-root
        self.socket = sockets / f"{node_id}.sock"
        self.port = port
        self.address = f"{host}:{port}"
        self.peers = peers
        self.extra = extra
        self.log = base / f"{node_id}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> DaemonProcess:
        return self.launch().await_ready()

    def launch(self) -> DaemonProcess:
        """Started, not waited for (``await_ready``): several start at once."""
        authenticated = {"--token-file", "--tls-cert"} & set(self.extra)
        cmd = [sys.executable, "-m", "mtckpt", "-v", "daemon", "--node-id", self.node_id,
               "--listen", self.address, "--socket", str(self.socket),
               "--memory-root", str(self.memory_root), "--peers", ",".join(self.peers),
               *self.extra, *([] if authenticated else ["--insecure"])]  # fmt: skip
        log = open(self.log, "ab")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
        return self

    def await_ready(self) -> DaemonProcess:
        line = self.proc.stdout.readline()
        if "ready" not in line:
            self.proc.kill()
            raise RuntimeError(
                f"daemon {self.node_id} did not start: {line!r}\n{self.log.read_text()}"
            )
        return self

    def client(self, **kwargs) -> Client:
        return Client(f"unix://{self.socket}", **kwargs)

    @property
    def token(self) -> str | None:
        """The token it was started with (``--token-file``), if any."""
        if "--token-file" not in self.extra:
            return None
        return Path(self.extra[self.extra.index("--token-file") + 1]).read_text().strip()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def terminate(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGUSR1)  # the daemon dumps its threads' stacks
            time.sleep(1)
            raise AssertionError(f"daemon {self.node_id} still running {timeout} s after "
                                 f"SIGTERM:\n{self.log.read_text()[-8000:]}") from None  # fmt: skip

    def lose_node(self) -> None:
        """The node is gone: its daemon killed and its roots deleted."""
        self.kill()
        shutil.rmtree(self.memory_root.parent)


def wait_for(condition, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def knows(daemon: DaemonProcess, addresses: set[str]) -> bool:
    """``daemon`` has reached the peers at ``addresses`` and learned who they are."""
    with daemon.client(token=daemon.token) as c:
        peers = {p.address: p for p in c.status().peers}
    return all(a in peers and peers[a].reachable and peers[a].node_id for a in addresses)


def replicated(daemon: DaemonProcess, run: str, *steps: int) -> bool:
    """Every shard of each of ``steps`` this daemon's node saved is held by all its
    targets. Name every step a test relies on: the newest are pushed first, so one step
    being done says nothing of an older one."""
    with daemon.client() as c:
        status = c.status()
    for step in steps:
        states = [r for r in status.replication if r.shard.run == run and r.shard.step == step]
        if not states or any(not set(r.targets) <= set(r.stored) or r.error for r in states):
            return False
    return True


def replication_of(daemon: DaemonProcess, run: str, step: int):
    with daemon.client() as c:
        return [r for r in c.status().replication if r.shard.run == run and r.shard.step == step]


def make_certs(directory: Path, names=("node",)) -> dict:
    """A CA and, per name, a certificate for 127.0.0.1 / localhost signed by it (PEM
    files): ``{"ca": path, name: (cert path, key path), ...}``."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def build(subject, issuer, public_key, signing_key, extensions):
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(signing_key, hashes.SHA256())

    def write(path: Path, cert, key) -> tuple[str, str]:
        cert_path, key_path = path.with_suffix(".crt"), path.with_suffix(".key")
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))  # fmt: skip
        return str(cert_path), str(key_path)

    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mtckpt test CA")])
    ca = build(ca_name, ca_name, ca_key.public_key(), ca_key,
               [(x509.BasicConstraints(ca=True, path_length=None), True)])  # fmt: skip
    files = {"ca": write(directory / "ca", ca, ca_key)[0]}
    for name in names:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        san = x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        )
        usage = x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        )
        cert = build(subject, ca_name, key.public_key(), ca_key, [(san, False), (usage, False)])
        files[name] = write(directory / name, cert, key)
    return files


def state(step: int, rank: int) -> dict:
    rng = np.random.default_rng(step * 100 + rank)
    return {
        "w": rng.standard_normal((256, 1024), dtype=np.float32),  # 1 MiB
        "b": rng.integers(-1000, 1000, 4097, dtype=np.int64),
        "step": step,
        "name": f"rank {rank}",
    }


def trainer(daemon, rank: int, world: int, peers: bool = False, run: str = TRAIN_RUN,
            local: bool = False) -> CheckpointManager:  # fmt: skip
    """The trainer of ``rank``, alone on ``daemon``'s node, using the daemon's memory tier:
    directly, or with ``peers`` through PeerTier (which learns it from the daemon); with
    ``local``, also the node's local tier (the daemon's local root)."""
    tiers: dict = (
        {"peers": PeerTier(daemon=f"unix://{daemon.socket}")}
        if peers
        else {"memory": MemoryTier(str(daemon.memory_root), keep=2)}
    )
    if local:
        tiers["local"] = LocalTier(str(daemon.local_root), keep=2)
    with mock.patch.dict(os.environ, {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}):
        return CheckpointManager(run, rank=rank, world_size=world, **tiers)


def save(daemon, rank: int, world: int, steps, token=None, local: bool = False) -> None:
    """A trainer on ``daemon``'s node saves ``steps`` into the daemon's memory tier (with
    ``local``, also into the node's local tier)."""
    with trainer(daemon, rank, world, local=local) as mgr:
        for step in steps:
            mgr.save(step, state(step, rank)).wait()
    with daemon.client(token=token) as client:
        client.notify(TRAIN_RUN, steps[-1])


def restore(daemon, rank: int, world: int, step=None, local: bool = False):
    with trainer(daemon, rank, world, local=local) as mgr:
        return mgr.restore(step=step)
