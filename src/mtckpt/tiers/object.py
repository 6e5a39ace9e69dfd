"""The object tier: checkpoint files at any fsspec URL, ``{url}/{run}/step-{step:012d}/{file}``.

An object appears whole or not at all (S3, GCS), so files are written under their final
names; the step's ``COMMIT`` object, written last by whichever rank finds every rank's
manifest present, is the only commit. Large files go up as multipart uploads with
bounded concurrency; every request is retried with exponential backoff on errors that
may pass (a dropped connection, an endpoint restarting), never on a missing bucket or a
refused permission; each part of a multipart upload is retried on its own. Reads of a data
file are ranged GETs run in parallel. Data files may be stored zstd-compressed
(:mod:`mtckpt.format.encoding`); the manifest says how each one is stored.
"""

from __future__ import annotations

import itertools
import logging
import posixpath
import random
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Any, TypeVar

from ..config import ObjectTier
from ..errors import ConfigError, CorruptCheckpointError, TierError
from ..format import encoding, naming
from .base import FileStat, Storage

log = logging.getLogger(__name__)

T = TypeVar("T")
BACKOFF_SECONDS = 0.2  # the first retry's wait; doubled each time, with jitter
BACKOFF_MAX_SECONDS = 10.0
# An unfinished multipart upload this old was left by a writer that died (or whose abort
# failed): its parts are billed until aborted. Younger ones may still be under way.
STALE_UPLOAD_SECONDS = 6 * 3600
_PERMANENT = (FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError,
              ValueError, TypeError)  # fmt: skip


class ObjectStorage(Storage):
    name = "remote"
    shared = True  # one storage for every rank of the job
    whole_files = True  # takes a data file whole, as it stores it (then sends it in parts)
    ranged_reads = True

    def __init__(
        self,
        url: str,
        *,
        storage_options: dict | None = None,
        part_size: int = 32 << 20,
        concurrency: int = 8,
        retries: int = 5,
        compression: str | None = None,
        compression_level: int = encoding.DEFAULT_LEVEL,
        full_every: int = 0,
    ) -> None:
        try:
            import fsspec
        except ImportError as exc:
            raise TierError(f"remote tier {url}: pip install 'mtckpt[s3]' ({exc})") from None
        self.url = url
        self.part_size, self.concurrency, self.retries = part_size, concurrency, retries
        self.compression, self.compression_level = compression, compression_level
        self.full_every = 0 if compression is not None else full_every
        protocol = url.split("://", 1)[0]
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        except (ImportError, ValueError) as exc:
            raise TierError(f"remote tier {url}: {exc}") from None
        self.root = root.rstrip("/")
        self._multipart = protocol == "s3"
        self._has_dirs = protocol in ("file", "local")

    def describe(self) -> str:
        return f"remote tier ({self.url})"

    # -- names -------------------------------------------------------------------------------

    def run_dir(self, run: str) -> str:
        return posixpath.join(self.root, naming.check_run(run))

    def step_path(self, run: str, step: int) -> str:
        return posixpath.join(self.run_dir(run), naming.step_dir(step))

    def path(self, run: str, step: int, name: str) -> str:
        return posixpath.join(self.step_path(run, step), naming.check_file_name(name))

    # -- requests ------------------------------------------------------------------------------

    def call(self, what: str, request: Callable[[], T]) -> T:
        """``request()``, retried with exponential backoff while its error may pass; the
        last error as a TierError naming this tier and ``what``."""
        for attempt in range(self.retries + 1):
            try:
                return request()
            except _PERMANENT:
                raise
            except Exception as exc:
                if attempt == self.retries:
                    raise TierError(f"{self.describe()}: {what}: {_reason(exc)} (after "
                                    f"{self.retries + 1} attempts)") from exc  # fmt: skip
                wait = min(BACKOFF_MAX_SECONDS, BACKOFF_SECONDS * 2**attempt)
                wait *= random.uniform(0.5, 1.0)
                log.warning("%s: %s failed (%s); retrying in %.1f s", self.describe(), what,
                            _reason(exc), wait)  # fmt: skip
                time.sleep(wait)
        raise AssertionError("unreachable")

    def _listing(self, path: str) -> list[str]:
        """Names directly under ``path``; [] if there is none."""
        self.fs.invalidate_cache(path)
        try:
            entries = self.call(f"list {path}", lambda: self.fs.ls(path, detail=False))
        except FileNotFoundError:
            return []
        return sorted({posixpath.basename(str(e).rstrip("/")) for e in entries})

    def check(self) -> None:
        """Raise TierError if the URL's S3 bucket is not there (other roots are made as
        files are written)."""
        if not self._multipart:
            return
        bucket = self.root.split("/", 1)[0]
        self.fs.invalidate_cache(bucket)
        if not self.call(f"look up {bucket}", lambda: self.fs.exists(bucket)):
            raise TierError(f"{self.describe()}: the bucket {bucket!r} does not exist")

    # -- Storage -------------------------------------------------------------------------------

    def runs(self) -> list[str]:
        return naming.runs_of(self._listing(self.root))

    def modified(self, run: str, step: int, name: str) -> float | None:
        path = self.path(run, step, name)
        try:
            info = self.call(f"look up {path}", lambda: self.fs.info(path))
        except FileNotFoundError:
            return None
        return _when(info)

    def steps(self, run: str) -> list[int]:
        return naming.steps_of(self._listing(self.run_dir(run)))

    def files(self, run: str, step: int) -> list[str]:
        return self._listing(self.step_path(run, step))

    def files_by_step(self, run: str) -> dict[int, list[str]]:
        top = self.run_dir(run)
        self.fs.invalidate_cache(top)
        try:  # every key under the run, without a delimiter: one paginated listing
            keys = self.call(f"list {top}", lambda: self.fs.find(top, withdirs=False))
        except FileNotFoundError:
            return {}
        found: dict[int, set[str]] = {}
        for key in keys:
            parts = posixpath.relpath(str(key), top).split("/")
            step = naming.parse_step_dir(parts[0]) if len(parts) == 2 else None
            if step is not None:
                found.setdefault(step, set()).add(parts[1])
        return {step: sorted(names) for step, names in sorted(found.items())}

    def stat_files(self, run: str, step: int) -> dict[str, FileStat]:
        path = self.step_path(run, step)
        self.fs.invalidate_cache(path)
        try:
            entries = self.call(f"list {path}", lambda: self.fs.ls(path, detail=True))
        except FileNotFoundError:
            return {}
        stats = {}
        for entry in entries:
            if entry.get("type") != "directory":
                name = posixpath.basename(str(entry["name"]).rstrip("/"))
                stats[name] = FileStat(int(entry.get("size") or 0), _when(entry))
        return dict(sorted(stats.items()))

    def exists(self, run: str, step: int, name: str) -> bool:
        return name in self.files(run, step)

    def read_bytes(self, run: str, step: int, name: str) -> bytes:
        path = self.path(run, step, name)
        return self.call(f"read {path}", lambda: self.fs.cat_file(path))

    def read_range(self, run: str, step: int, name: str, start: int, end: int) -> bytes:
        """Bytes ``start`` to ``end`` of a file, in one ranged GET."""
        path = self.path(run, step, name)
        data = self.call(f"read {path} bytes {start}-{end}",
                         lambda: self.fs.cat_file(path, start=start, end=end))  # fmt: skip
        if len(data) != end - start:  # the object is shorter than it was written
            raise CorruptCheckpointError(f"{self.describe()}: {path}: {len(data)} bytes at "
                                         f"{start}, expected {end - start}")  # fmt: skip
        return data

    def map(self, run: str, step: int, name: str) -> Any:
        """The whole file in memory, fetched as ranged GETs of ``part_size`` in parallel."""
        path = self.path(run, step, name)
        self.fs.invalidate_cache(path)
        size = self.call(f"look up {path}", lambda: self.fs.size(path))
        buffer = bytearray(size)
        view = memoryview(buffer)

        def fetch(start: int) -> None:
            end = min(size, start + self.part_size)
            view[start:end] = self.read_range(run, step, name, start, end)

        with ThreadPoolExecutor(min(self.concurrency, max(1, -(-size // self.part_size)))) as pool:
            list(pool.map(fetch, range(0, size, self.part_size)))
        view.release()
        return buffer

    def write_bytes(self, run: str, step: int, name: str, data: bytes) -> None:
        self.write_stream(run, step, name, len(data), [data])

    def write_stream(
        self, run: str, step: int, name: str, size: int | None, chunks: Iterable
    ) -> None:
        """Upload the consecutive buffers ``chunks`` (``size`` bytes; None: not known
        beforehand) as ``name``. On S3, from two parts on, as a multipart upload: parts of
        ``part_size`` sent as the chunks come, ``concurrency`` at a time, each retried on
        its own; a failed upload is aborted."""
        path = self.path(run, step, name)
        if self._has_dirs:
            self.fs.makedirs(self.step_path(run, step), exist_ok=True)
        try:
            if self._multipart:
                sent = self._upload_parts(path, _parts(chunks, self.part_size))
            else:
                pieces = [memoryview(c).cast("B") for c in chunks]
                body = pieces[0] if len(pieces) == 1 else memoryview(b"".join(pieces))
                sent = body.nbytes
                if not self._has_dirs:  # a local file takes the view; others may keep it
                    body = bytes(body)
                self.call(f"upload {path}", lambda: self.fs.pipe_file(path, body))
        except FileNotFoundError as exc:
            raise TierError(f"{self.describe()}: cannot upload {path}: {exc} (does the bucket "
                            "exist?)") from exc  # fmt: skip
        finally:
            self.fs.invalidate_cache(self.step_path(run, step))
        if size is not None and sent != size:
            self.delete(run, step, name)
            raise ValueError(f"{path}: expected {size} bytes, got {sent}")

    def _upload_parts(self, path: str, parts: Iterator[memoryview]) -> int:
        """Upload ``parts`` to S3 as one object (one PUT if there is a single part); the
        bytes sent."""
        bucket, key = path.split("/", 1)
        first = next(parts, memoryview(b""))
        second = next(parts, None)
        if second is None:
            body = bytes(first)
            self.call(f"upload {path}", lambda: self.fs.call_s3(
                "put_object", Bucket=bucket, Key=key, Body=body))  # fmt: skip
            return len(body)
        started = self.call(f"start the upload of {path}", lambda: self.fs.call_s3(
            "create_multipart_upload", Bucket=bucket, Key=key))  # fmt: skip
        upload = started["UploadId"]

        def send(number: int, part: memoryview) -> dict:
            body = bytes(part)  # copied out of node memory only while in flight
            reply = self.call(f"upload part {number} of {path}", lambda: self.fs.call_s3(
                "upload_part", Bucket=bucket, Key=key, UploadId=upload, PartNumber=number,
                Body=body))  # fmt: skip
            return {"PartNumber": number, "ETag": reply["ETag"]}

        sent, in_flight, done = 0, set(), []
        try:
            with ThreadPoolExecutor(self.concurrency) as pool:
                for number, part in enumerate(itertools.chain([first, second], parts), 1):
                    if len(in_flight) >= self.concurrency:
                        finished, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                        done += [f.result() for f in finished]
                    in_flight.add(pool.submit(send, number, part))
                    sent += part.nbytes
                done += [f.result() for f in in_flight]
            listing = {"Parts": sorted(done, key=lambda p: p["PartNumber"])}
            self.call(f"finish the upload of {path}", lambda: self.fs.call_s3(
                "complete_multipart_upload", Bucket=bucket, Key=key, UploadId=upload,
                MultipartUpload=listing))  # fmt: skip
        except BaseException:
            try:
                self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key,
                                UploadId=upload)  # fmt: skip
            except Exception as exc:  # clean_leftovers aborts it later
                log.warning("%s: cannot abort the upload of %s: %s", self.describe(), path,
                            _reason(exc))  # fmt: skip
            raise
        return sent

    def delete(self, run: str, step: int, name: str) -> None:
        path = self.path(run, step, name)
        try:
            self.call(f"delete {path}", lambda: self.fs.rm_file(path))
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(self.step_path(run, step))

    def clean_leftovers(self, run: str, rank: int) -> None:
        """Abort unfinished multipart uploads of ``rank``'s data files in ``run`` begun more
        than STALE_UPLOAD_SECONDS ago (S3 only; an S3 lifecycle rule aborting incomplete
        uploads after a day or two covers ranks that never start again)."""
        if not self._multipart:
            return
        bucket, _, prefix = self.run_dir(run).partition("/")
        name = naming.data_file(rank)
        listing = self.call(f"list unfinished uploads under {bucket}/{prefix}",
                            lambda: self.fs.call_s3("list_multipart_uploads", Bucket=bucket,
                                                    Prefix=prefix + "/"))  # fmt: skip
        now = time.time()
        for upload in listing.get("Uploads", []):
            key, initiated = upload["Key"], upload["Initiated"].timestamp()
            if posixpath.basename(key) != name or now - initiated < STALE_UPLOAD_SECONDS:
                continue
            log.warning("%s: aborting an unfinished upload of %s begun %.1f h ago",
                        self.describe(), key, (now - initiated) / 3600)  # fmt: skip
            self.call(f"abort the upload of {key}",
                      lambda k=key, u=upload["UploadId"]: self.fs.call_s3(
                          "abort_multipart_upload", Bucket=bucket, Key=k, UploadId=u))  # fmt: skip

    def remove_step_dir(self, run: str, step: int) -> bool:
        if self.files(run, step):
            return False
        path = self.step_path(run, step)
        try:  # object stores have no directories; a file:// root has
            self.fs.rmdir(path)
        except (FileNotFoundError, NotImplementedError, OSError):
            pass
        self.fs.invalidate_cache(self.run_dir(run))
        return True


def object_storage(cfg: ObjectTier, check: bool = True) -> ObjectStorage:
    """The storage of an ObjectTier. With ``check``, a bucket that does not exist is a
    configuration error, an endpoint that does not answer is reported (and retried by each
    flush)."""
    try:
        storage = ObjectStorage(cfg.url, storage_options=cfg.storage_options,
                                part_size=cfg.part_size, concurrency=cfg.concurrency,
                                retries=cfg.retries, compression=cfg.compression,
                                compression_level=cfg.compression_level,
                                full_every=cfg.full_every if cfg.incremental else 0)  # fmt: skip
    except TierError as exc:
        raise ConfigError(str(exc)) from None
    if not check:
        return storage
    try:
        storage.check()
    except TierError as exc:
        if "does not exist" in str(exc):
            raise ConfigError(str(exc)) from None
        log.error("%s (saves go on; its flushes are retried)", exc)
    return storage


def _parts(chunks: Iterable, size: int) -> Iterator[memoryview]:
    """The bytes of ``chunks`` in parts of ``size`` (the last one shorter): slices of a
    chunk where a part lies within it, else copies."""
    pending = bytearray()
    for chunk in chunks:
        view = memoryview(chunk).cast("B")
        while view.nbytes:
            if not pending and view.nbytes >= size:
                yield view[:size]
                view = view[size:]
                continue
            take = min(size - len(pending), view.nbytes)
            pending += view[:take]
            view = view[take:]
            if len(pending) == size:
                yield memoryview(pending)
                pending = bytearray()
    if pending:
        yield memoryview(pending)


def _when(info: dict) -> float | None:
    """When an object was last written, from its listing or ``info`` entry."""
    when = info.get("LastModified") or info.get("mtime") or info.get("created")
    return when.timestamp() if hasattr(when, "timestamp") else when


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
