"""The gateway's JSONL request log: one JSON object per line and per request, appended by a
writer thread so the event loop never waits on the disk.

``log(record)`` puts the record on a bounded queue (``max_queue``) without blocking; when the
queue is full the record is dropped and counted (``dropped``; the gateway exports it as the
metric ``leanscale_gateway_log_dropped``), because a slow disk must not slow every request. The
writer thread takes records off the queue, writes them and flushes the file each time the queue
is empty (so a line is on disk a few milliseconds after its request ended, and a crash loses at
most what was queued). :meth:`RequestLog.close` writes what is queued, then closes the file.

The file is opened in append mode and never rotated by the gateway: rotate it from outside
(``logrotate`` with ``copytruncate``, or move it away and restart the gateway); a line is written
with one ``write`` call, so a reader never sees half a record unless the disk fills up.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["RequestLog"]

logger = logging.getLogger("leanscale.cascade.gateway")
_STOP = object()


class RequestLog:
    """Append JSON lines to ``path`` from a writer thread (see the module docstring).

    Args:
        path: the JSONL file (created when missing, appended to otherwise).
        max_queue: records waiting for the writer; beyond, :meth:`log` drops and counts them.
        start: start the writer thread now (tests may start it later with :meth:`start`).
    """

    def __init__(self, path: str | Path, max_queue: int = 10_000, *, start: bool = True):
        self.path = Path(path)
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self.dropped = 0  # records not written because the queue was full
        self.written = 0
        self.errors = 0  # records lost to a write error (e.g. a full disk)
        self._file = None
        self._thread: threading.Thread | None = None
        self._closed = False
        if start:
            self.start()

    def start(self) -> None:
        """Open the file and start the writer thread (once)."""
        if self._thread is not None:
            return
        # O_APPEND and unbuffered: one write() per line, so the lines of several workers
        # appending to one file never interleave inside a line
        self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115 -- closed by close()
        self._thread = threading.Thread(target=self._run, name="gateway-request-log", daemon=True)
        self._thread.start()

    def log(self, record: dict[str, Any]) -> bool:
        """Queue ``record`` (JSON-able) for writing; never blocks. False (and counted in
        ``dropped``) when the queue is full or the log is closed."""
        if self._closed:
            self.dropped += 1
            return False
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1
            return False
        return True

    def _run(self) -> None:
        f = self._file
        while True:
            item = self._queue.get()
            stop = item is _STOP
            if not stop:
                try:
                    f.write((json.dumps(item, separators=(",", ":"), ensure_ascii=False, default=str) + "\n")
                            .encode("utf-8", "surrogatepass"))
                    self.written += 1
                except Exception:  # a full disk, a record that cannot be encoded: counted, not fatal
                    self.errors += 1
                    logger.exception("the request log could not write a record")
            if stop or self._queue.empty():
                try:
                    f.flush()
                except Exception:
                    self.errors += 1
                    logger.exception("the request log could not flush %s", self.path)
            self._queue.task_done()  # after the flush: flush() returns once the lines are on disk
            if stop:
                return

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued so far is written and flushed; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._queue.all_tasks_done.wait(left)
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, flush and close the file (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._queue.put(_STOP)  # blocks at most until the writer makes room
            self._thread.join(timeout)
        if self._file is not None:
            try:
                self._file.close()
            except Exception:
                logger.exception("the request log could not close %s", self.path)
        self._thread = None
