"""Content digests: compute them, and check streamed bytes against them.

Every byte kitfs hands out must trace back to a digest, so verification
happens while bytes stream past, never by holding a blob in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import re
import threading

import trio

from kitfs.errors import IntegrityError, RegistryError

_DIGEST_RE = re.compile(r"^(sha256):([a-f0-9]{64})$|^(sha512):([a-f0-9]{128})$")


def split_digest(digest: str) -> tuple[str, str]:
    """(algorithm, hex) of an OCI digest; only sha256 and sha512 are accepted."""
    m = _DIGEST_RE.match(digest)
    if m is None:
        raise RegistryError(f"unsupported or malformed digest {digest!r}")
    if m.group(1):
        return m.group(1), m.group(2)
    return m.group(3), m.group(4)


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def short(digest: str) -> str:
    """A digest shortened for messages, the way users recognise them."""
    algo, _, hexpart = digest.partition(":")
    return f"{algo}:{hexpart[:12]}"


#: Blobs from this size (or of unknown size) are hashed in a helper thread while they arrive.
THREADED_HASH_MIN = 16 << 20


class DigestVerifier:
    """Hashes a stream as it passes and checks its length and digest at the end.

    Hashing runs in a helper thread fed through a queue when `threaded` is set
    (hashlib releases the GIL on big buffers), so a fast stream is limited by
    the network or by sha256, whichever is slower, not by their sum. The
    thread holds references to at most `max_queued` chunks.
    """

    def __init__(
        self,
        digest: str,
        size: int | None,
        what: str,
        *,
        threaded: bool = False,
        max_queued: int = 32,
        prefix: tuple[int, hashlib._Hash] | None = None,
    ) -> None:
        """`prefix`: (bytes already hashed, the hash of them), for a stream that resumes
        a blob partway (a download picked up where an interrupted one stopped)."""
        self.algorithm, self.expected_hex = split_digest(digest)
        self.digest = digest
        self.size = size
        self.what = what
        self.received = 0
        self._hash = hashlib.new(self.algorithm)
        if prefix is not None:
            self.received, hashed = prefix
            if hashed.name != self.algorithm:
                raise ValueError(f"a {hashed.name} prefix cannot resume a {self.algorithm} digest")
            self._hash = hashed.copy()
        self._queue: queue.Queue[bytes | None] | None = None
        self._thread: threading.Thread | None = None
        if threaded:
            self._queue = queue.Queue(maxsize=max_queued)
            self._thread = threading.Thread(
                target=self._run, args=(self._queue,), name="kitfs-digest", daemon=True
            )
            self._thread.start()

    def _run(self, chunks: queue.Queue[bytes | None]) -> None:
        while True:
            chunk = chunks.get()
            if chunk is None:
                return
            self._hash.update(chunk)

    def check_length(self, extra: int) -> None:
        """Raise before accepting bytes past the expected size."""
        if self.size is not None and self.received + extra > self.size:
            raise IntegrityError(
                f"{self.what}: registry sent more than the expected {self.size} bytes"
            )

    async def update(self, chunk: bytes) -> None:
        self.check_length(len(chunk))
        self.received += len(chunk)
        if self._queue is None:
            self._hash.update(chunk)
            return
        try:
            self._queue.put_nowait(chunk)
        except queue.Full:
            # Backpressure without blocking the event loop: wait in a worker thread.
            await trio.to_thread.run_sync(self._queue.put, chunk)

    def update_sync(self, chunk: bytes) -> None:
        """For the unthreaded verifier only."""
        assert self._queue is None
        self.check_length(len(chunk))
        self.received += len(chunk)
        self._hash.update(chunk)

    async def _finish_hash(self) -> str:
        if self._queue is not None and self._thread is not None:
            queue_, thread = self._queue, self._thread
            self._queue = self._thread = None
            await trio.to_thread.run_sync(queue_.put, None, abandon_on_cancel=True)
            await trio.to_thread.run_sync(thread.join, abandon_on_cancel=True)
        return self._hash.hexdigest()

    def abort(self) -> None:
        """Stop the helper thread without waiting; for streams abandoned midway."""
        if self._queue is not None:
            queue_ = self._queue
            self._queue = self._thread = None
            # Drop what is queued so the thread sees the sentinel promptly.
            try:
                while True:
                    queue_.get_nowait()
            except queue.Empty:
                pass
            with contextlib.suppress(queue.Full):  # emptied just above
                queue_.put_nowait(None)

    async def verify(self) -> None:
        """Raise IntegrityError unless exactly `size` bytes with the right digest arrived."""
        got = await self._finish_hash()
        self._raise_if_wrong(got)

    def verify_sync(self) -> None:
        assert self._queue is None
        self._raise_if_wrong(self._hash.hexdigest())

    def _raise_if_wrong(self, got: str) -> None:
        if self.size is not None and self.received != self.size:
            raise IntegrityError(
                f"{self.what}: truncated, got {self.received} of {self.size} bytes"
            )
        if got != self.expected_hex:
            raise IntegrityError(
                f"{self.what}: content does not match its digest "
                f"(got {self.algorithm}:{got[:12]}, expected {short(self.digest)})"
            )
