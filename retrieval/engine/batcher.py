"""Concurrent single-query searches on one index, answered together.

A service's request threads each ask one query of a shared `Index` (or `ShardedIndex`).
Searched one by one, each pays its own FAISS search and kernel calls, and their OpenMP
threads fight over the cores. `SearchBatcher` gathers the queries that arrive within
`wait_s` of the oldest waiting one (at most `max_batch`), and those that arrive while a
batch is being answered or within `wait_s` after it (or `wait_fraction` of what a batch
of the queries expected takes, at the last batch's time a query, when longer: HTTP
clients come back through the server's event loop one by one, several milliseconds, and
a batch that leaves without them splits the clients into half batches taking turns), and
answers them with one `search` call per distinct `SearchOptions`: their images are
described in one extractor call (store hits need no network) and ranked with one FAISS
batch search (`search.rank_many`). A batch leaves before its deadline once the queries
it expects are in: the last batch's callers and those that came during it (so a lone
caller is answered at once; before the first batch it waits the full `wait_s`). Callers
are expected back only in the share that recent batches saw come back (`return_share`):
independent users of a service (open-loop traffic) never ask again, and waiting for them
only added latency. Each caller gets the result that `search` gives its query alone, an
unreadable query included (a result with its `error`); an exception of `search` (a bad
option for this index) goes to every caller of that options group.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from ..config import MAX_BATCH, SearchOptions
from .query import K_NOT_GIVEN, QueryResult, search_options

WAIT_S = 0.002
# At 1,000,000 images a batch of 8 takes ~80 ms and 8 HTTP clients are back within ~8 ms:
# a tenth keeps their batches full (benchmarks/results/concurrency.md, "HTTP clients";
# at 100,000 images, ~30 ms a batch, mostly).
WAIT_FRACTION = 0.1
# Callers are waited for only while they come back: the share of a batch's callers that
# asked again soon after its answer (RETURN_WINDOW), averaged over batches (weight of the
# newest RETURN_WEIGHT), must be at least RETURN_SHARE. Independent users of a service
# (open loop) never come back: waiting for them took the median latency at 90 arrivals a
# second on 1,000,000 images from 130 to 214-224 ms (concurrency.md, "Callers that do
# not come back").
RETURN_SHARE = 0.5
RETURN_WEIGHT = 0.25
# A caller has come back when it asks again within this many times the wait its batch's
# callers get: a batch's deadline counts from its first query, so a returning caller is
# gathered well after the wait (HTTP clients at 1,000,000 images: 8-16 ms after a wait of
# 8). Twice split HTTP clients' batches at 100,000 images (150-160 req/s against 162-171);
# three times did not (concurrency.md, "Callers that do not come back").
RETURN_WINDOW = 3.0
BATCH_LOG = 1000  # batch sizes kept in `SearchBatcher.batches`


class Searchable(Protocol):
    """What the batcher needs of an index (`Index`, `ShardedIndex`)."""

    def search(self, queries: Sequence[Any], *, options: SearchOptions) -> list[QueryResult]: ...


@dataclass
class _Request:
    query: Any  # a path, or (path, crop box in pixels)
    options: SearchOptions
    future: cf.Future
    arrived: float


class SearchBatcher:
    """Answers single queries from many threads together; one per shared index.

    >>> batcher = SearchBatcher(Index.open("my-index"))     # doctest: +SKIP
    >>> batcher.search("query.jpg", k=5).hits                # doctest: +SKIP (from any thread)
    >>> batcher.close()                                      # doctest: +SKIP

    The batches run on one thread of the batcher's own, each using every core (FAISS and
    the kernel are parallel inside), so a batch never competes with another for them.
    What it did, for a service's metrics: `batches` (queries per batch, the last 1,000),
    `waited_out` (batches that left at their deadline, short of the expected callers) and
    `return_share` (how many of a batch's callers ask again: near 1 for closed-loop
    clients, near 0 for independent users).
    """

    def __init__(self, index: Searchable, *, wait_s: float = WAIT_S, max_batch: int = MAX_BATCH,
                 wait_fraction: float = WAIT_FRACTION) -> None:
        if wait_s < 0 or max_batch < 1 or wait_fraction < 0:
            raise ValueError(f"wait_s and wait_fraction must be >= 0 and max_batch >= 1 "
                             f"(got {wait_s}, {wait_fraction}, {max_batch})")
        self.index, self.wait_s, self.max_batch, self.wait_fraction = index, wait_s, max_batch, wait_fraction
        self._straggle = 0.0  # wait_fraction of an expected batch's time
        # Whether the callers of a batch come back: how many of the last batch's callers
        # (`_callers`) asked again within `_window` of its answer (`_returned`), and the
        # running share that decides whether the next batches wait for them.
        self._callers = 0
        self._returned = 0
        self._window = 0.0
        self.return_share = 1.0  # closed-loop callers assumed until batches show otherwise
        self.batches: collections.deque[int] = collections.deque(maxlen=BATCH_LOG)  # queries per batch
        self.waited_out = 0  # batches that left at their deadline, short of the expected callers
        self._pending: list[_Request] = []
        self._answered = float("-inf")  # when the last batch was answered (monotonic)
        # Queries expected in the next batch: the last batch's callers (who ask again at
        # once in a closed loop) and those that came during it. Unknown at first.
        self._expected = max_batch
        self._changed = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="retrieval-batcher", daemon=True)
        self._thread.start()

    def submit(self, query: Any, options: SearchOptions = SearchOptions()) -> cf.Future:
        """Queue one query (a path, or (path, crop box)); its future's result is its
        `QueryResult` (for `asyncio.wrap_future` in an event loop)."""
        if not isinstance(options, SearchOptions):
            raise TypeError(f"options must be a SearchOptions (got {type(options).__name__})")
        future: cf.Future = cf.Future()
        with self._changed:
            if self._closed:
                raise RuntimeError("this SearchBatcher is closed; make a new one for the index")
            now = time.monotonic()
            if now - self._answered <= self._window:
                self._returned += 1
            self._pending.append(_Request(query, options, future, now))
            self._changed.notify()
        return future

    def search(self, query: Any, k: int | None = K_NOT_GIVEN, *, options: SearchOptions | None = None,
               **keywords) -> QueryResult:
        """`Index.search` of one query (same options, as `options=` or keywords), answered
        together with the queries other threads ask meanwhile."""
        return self.submit(query, search_options(k, options, keywords)).result()

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._pending and not self._closed:
                    self._changed.wait()
                if not self._pending:
                    return  # closed, and every queued query answered
                # Also wait for the callers of the batch just answered: a service's
                # threads ask again at once, and without them the next batch holds only
                # the queries that came during the last one. Clients then settle into two
                # half batches taking turns, at about 0.8x the full batches' throughput
                # (benchmarks/results/concurrency.md, "The shortlist"). But no longer than
                # until the expected callers are in: a lone caller paid wait_s on every
                # query ("Expected callers" there).
                deadline = max(self._pending[0].arrived, self._answered) + max(self.wait_s, self._straggle)
                while len(self._pending) < self._expected and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self.waited_out += 1
                        break
                    self._changed.wait(left)
                batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
            started = time.monotonic()
            answers = self._search([r for r in batch if r.future.set_running_or_notify_cancel()])
            with self._changed:
                if self._callers:
                    came = min(self._returned, self._callers) / self._callers
                    self.return_share += RETURN_WEIGHT * (came - self.return_share)
                self._answered = time.monotonic()
                self._callers, self._returned = len(batch), 0
                # This batch's callers (if callers come back) and the queries already here.
                queued = len(self._pending)
                full = max(1, min(self.max_batch, len(batch) + queued))
                self._expected = full if self.return_share >= RETURN_SHARE else max(1, min(self.max_batch, queued))
                # A share of what a batch of the expected size would take: after a half
                # batch, a share of its own short time would again miss the other half.
                per_query = (self._answered - started) / max(1, len(batch))
                self._straggle = self.wait_fraction * per_query * self._expected
                # Returns are counted over the wait this batch's callers would get, waited
                # or not: callers that start coming back are seen again.
                self._window = RETURN_WINDOW * max(self.wait_s, self.wait_fraction * per_query * full)
            # The callers are woken only once the answer's time is set: one that asks again
            # at once is counted as come back.
            for future, result, error in answers:
                if error is None:
                    future.set_result(result)
                else:
                    future.set_exception(error)

    def _search(self, batch: list[_Request]) -> list[tuple[cf.Future, QueryResult | None, Exception | None]]:
        """Each request's future with its result, or with the exception of its options
        group's `search`."""
        self.batches.append(len(batch))
        groups: dict[SearchOptions, list[_Request]] = {}
        for request in batch:
            groups.setdefault(request.options, []).append(request)
        answers = []
        for options, members in groups.items():
            try:
                results = self.index.search([r.query for r in members], options=options)
            except Exception as err:  # noqa: BLE001 - raised in each caller's thread
                answers.extend((r.future, None, err) for r in members)
                continue
            answers.extend((r.future, result, None) for r, result in zip(members, results))
        return answers

    def stats(self) -> dict:
        """What the batches were, for a service's metrics: the most queries a batch, how
        many of the last 1,000 batches there are and their mean size, the batches that left
        short of the callers they expected, and the share of callers that come back."""
        with self._changed:
            sizes = list(self.batches)
            return {"max_batch": self.max_batch, "batches": len(sizes),
                    "mean_batch": round(sum(sizes) / len(sizes), 2) if sizes else None,
                    "waited_out": self.waited_out, "return_share": round(self.return_share, 3)}

    def close(self) -> None:
        """Answer the queries already queued, then stop (the index stays open)."""
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._thread.join()

    def __enter__(self) -> "SearchBatcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
