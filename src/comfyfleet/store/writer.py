"""The thread that runs a SQLite store's transactions for async code.

SQLite has one writer. The control plane's transactions therefore run one after the
other on this thread, and those that queue up while it works may share one transaction
and its commit: on the jobs' hot path (agents leasing, reporting and finishing jobs,
users submitting them) most of a short transaction's cost is its ``BEGIN IMMEDIATE``,
its commit (the WAL append) and the session around it, which a shared commit pays once
for up to ``MAX_SHARED`` of them.

A shared transaction behaves as if its works had run one after the other in their own
transactions: each work's objects leave the session before the next work runs (the next
one reads the rows afresh, as it would in a transaction of its own), and a work's
result is handed back only once the commit that holds its writes has succeeded. When
one work raises, or the commit fails, the shared transaction is rolled back and every
work of it runs again, alone in its own transaction: the others are not lost, and the
failing one fails as it would have alone. That is why only a work with no effect
outside its session may share a commit (``Store.run(work, share_commit=True)``): it may
run twice.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import logging
import queue
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

#: The most works one transaction takes: the last of them waits for all the others.
MAX_SHARED: Final = 32


@dataclass(slots=True)
class _Work:
    work: Callable[[Session], Any]
    context: contextvars.Context
    future: concurrent.futures.Future[Any]
    shared: bool


class StoreWriter:
    """One daemon thread running works in transactions from ``transaction()``."""

    def __init__(
        self, transaction: Callable[[], AbstractContextManager[Session]], *, name: str
    ) -> None:
        self._transaction = transaction
        self._queue: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(
        self, work: Callable[[Session], Any], *, shared: bool
    ) -> concurrent.futures.Future[Any]:
        """Queue ``work``; the future holds its result once its transaction committed.

        It runs in a copy of the caller's context (contextvars), as ``asyncio.to_thread``
        would run it.
        """
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._queue.put(_Work(work, contextvars.copy_context(), future, shared))
        return future

    def close(self) -> None:
        """Stop once the works queued so far have run (without waiting for them)."""
        self._queue.put(None)

    # ------------------------------------------------------------------ the thread

    def _serve(self) -> None:
        held: _Work | None = None
        while True:
            first = held if held is not None else self._queue.get()
            held = None
            if first is None:
                return
            batch = [first]
            stop = False
            while first.shared and len(batch) < MAX_SHARED:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                if not item.shared:
                    held = item  # runs next, alone
                    break
                batch.append(item)
            self._run(batch)
            if stop:
                return

    def _run(self, batch: list[_Work]) -> None:
        # A caller that gave up (its task was cancelled) cancelled its future: skip it.
        live = [item for item in batch if item.future.set_running_or_notify_cancel()]
        if len(live) == 1:
            self._alone(live[0])
            return
        if not live:
            return
        results: list[Any] = []
        try:
            with self._transaction() as session:
                for item in live:
                    results.append(item.context.run(item.work, session))
                    session.flush()
                    # The next work reads the rows afresh, as in a transaction of its own;
                    # this one's objects stay usable, as after a commit.
                    session.expunge_all()
        except Exception as error:
            log.debug(
                "a shared transaction of %d works failed (%s): each runs again alone",
                len(live),
                type(error).__name__,
            )
            for item in live:
                self._alone(item)
            return
        for item, result in zip(live, results, strict=True):
            item.future.set_result(result)

    def _alone(self, item: _Work) -> None:
        try:
            with self._transaction() as session:
                result = item.context.run(item.work, session)
        except BaseException as error:  # handed to the caller, whatever it is
            item.future.set_exception(error)
        else:
            item.future.set_result(result)
