"""The server's one decode thread: requests wait in a bounded queue and run in waves over a slot pool.

A wave takes every waiting request that samples alike (greedy, or one temperature and top-p: the
engine samples every row of a run with the same settings) and runs all their rows (prompts times
``n``) through one continuous-batching pool of ``slots`` rows (:mod:`surgery.decode.slots`), each
row under its own request's stack (``tr.generate(..., stacks=...)``, :mod:`surgery.decode.row_stacks`).
A row gets the tokens it gets alone under its stack, whatever the rows beside it carry, and a
finished row's slot goes to the next waiting row of the wave at once.

A request that arrives while a wave runs joins it as soon as a slot is free
(:mod:`surgery.decode.late_rows`) when it samples as the wave does and its blocks are already
in the wave: it brings none, or the same blocks (equal configs and files) as a request of the wave
and no per-row answers, so its rows carry that request's block instances (each row keeps its own
records). Other requests wait for the next wave. With the static cache a late request must also
fit the columns and token budget the wave's cache was sized for. A wave holding a probe with
per-row answers (the MI estimator) takes no late requests: its answers are fixed when it starts.
A wave that would not fill its slots first waits ``window_s`` (20 ms) for more requests, so a
burst of requests starts together. A wave keeps empty slots open for late requests only when
requests came in while the last wave ran (or it fills every slot anyway): an open slot is decoded
every step, which a GPU hardly notices and a CPU pays for, and a lone client's requests never
overlap.

Per row the server's own block (:class:`~experiments.serving.tap.ServerTap`, carried by every
row, acting after the request's blocks) streams text, applies the request's stop strings and
stops rows whose client has gone. When a row leaves its slot, its result (text, finish reason,
and in ``surgery`` where each intervention fired and each probe's summary, as a study records
them: :func:`experiments.row_summaries.summarise_row`) goes to its request at once.

Sampling: a row's random stream is seeded from its request's ``seed`` and its index in the
request (:mod:`surgery.decode.sampling`), so a request with a seed samples the same completion
whatever it runs beside; without a seed, a fresh stream per row.

A block that the model refuses when the wave's trace binds it (e.g. an MI estimator without
answers) fails only its own request with a 400; the other requests run.

Example::

    scheduler = Scheduler(model, slots=8, max_queue=64)
    scheduler.submit(job)          # a Job; its events arrive through job.send
    scheduler.close()
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import surgery
from experiments.row_summaries import summarise_row
from experiments.serving.errors import RequestError, queue_full
from experiments.serving.request_blocks import RequestStack
from experiments.serving.tap import RowText, ServerTap, cut_at_stop
from surgery.decode.generation_output import FinishedRow
from surgery.decode.late_rows import LateRow, LateRows

__all__ = ["Job", "RowResult", "Scheduler"]

log = logging.getLogger(__name__)

#: The engine's stop reasons as OpenAI finish reasons (the tap's stops are stop strings or gone clients).
FINISH_REASONS = {"eos": "stop", "stop_string": "stop", "length": "length", "block": "stop"}


@dataclass
class RowResult:
    """One finished row of a request: a choice of the response."""

    index: int
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str
    surgery: dict


@dataclass
class Job:
    """One request's rows, from the queue to the last row.

    Attributes:
        prompts: token ids per prompt (chat requests have one).
        n: completions per prompt.
        max_tokens: the budget of each row.
        greedy, temperature, top_p, seed: how rows pick tokens.
        stops: stop strings.
        stream: whether text is sent as it grows.
        stack: the request's blocks.
        send: hands an event to the request's handler (called from the decode thread):
            ``("started",)``, ``("text", index, piece)``, ``("row", RowResult)``, ``("done",)``,
            ``("error", RequestError)``.
    """

    prompts: list[list[int]]
    n: int
    max_tokens: int
    greedy: bool
    temperature: float
    top_p: float
    seed: int | None
    stops: tuple[str, ...]
    stream: bool
    stack: RequestStack
    send: Callable[[tuple], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    done_rows: int = 0
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n

    @property
    def sampling(self) -> tuple:
        """Requests with equal values share a wave."""
        return ("greedy",) if self.greedy else ("sample", self.temperature, self.top_p)

    def row_key(self, index: int) -> str:
        """The random stream's name of row ``index``: from the seed, or fresh for this request."""
        return f"seed:{self.seed}:row:{index}" if self.seed is not None else f"unseeded:{self.uid}:row:{index}"


class Scheduler:
    """Runs jobs in waves on one thread (module docstring).

    Args:
        model: the served model (the thread is the only one that runs it).
        slots: rows decoded together.
        max_queue: requests that may wait; one more is refused with 429.
        cache: the decode step's KV cache (``"dynamic"`` or ``"static"``).
        max_tokens: the largest budget a request may have (late rows of a dynamic-cache wave up to it).
        window_s: how long a wave that would not fill its slots waits for more requests before it
            starts (a burst of requests then starts together; a lone request waits this long).
    """

    def __init__(self, model, slots: int, max_queue: int, cache: str = "dynamic", max_tokens: int = 2048,
                 window_s: float = 0.02):
        self.model, self.slots, self.max_queue, self.cache = model, slots, max_queue, cache
        self.max_tokens, self.window_s = max_tokens, window_s
        self.queue: deque[Job] = deque()
        self.stats = {"waves": 0, "joined_late": 0, "finished_rows": 0, "cancelled_rows": 0, "refused": 0}
        self._tap: ServerTap | None = None
        self._contended = False  # a request arrived while a wave ran: the next wave opens every slot
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="surgery-serve-decode", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue ``job``.

        Raises:
            RequestError: 429 when ``max_queue`` requests already wait.
        """
        with self._wake:
            if len(self.queue) >= self.max_queue:
                self.stats["refused"] += 1
                raise queue_full(self.max_queue)
            self.queue.append(job)
            self._contended = self._contended or self.busy_slots() > 0
            self._wake.notify()

    @contextlib.contextmanager
    def held(self):
        """While inside, no wave starts: jobs submitted meanwhile start together (tests, benchmarks)."""
        with self._wake:
            yield

    def busy_slots(self) -> int:
        """Slots holding a row right now."""
        tap = self._tap
        return 0 if tap is None else sum(row is not None for row in tap.slot_rows)

    def close(self) -> None:
        """Stop after the running wave; waiting requests get a 503-style error."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        for job in list(self.queue):
            job.send(("error", RequestError(None, "the server is shutting down", status=503)))
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self.queue and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                # a burst of requests arrives over a few milliseconds: start its wave with all of them
                deadline = time.monotonic() + self.window_s
                while sum(job.rows for job in self.queue) < self.slots and time.monotonic() < deadline:
                    self._wake.wait(timeout=max(0.0, deadline - time.monotonic()))
                sampling = self.queue[0].sampling
                wave = [job for job in self.queue if job.sampling == sampling]
                self.queue = deque(job for job in self.queue if job.sampling != sampling)
            wave = [job for job in wave if not job.cancelled.is_set()]
            try:
                if wave:
                    self._run(wave)
            except Exception as error:  # noqa: BLE001 (the decode thread must outlive any one wave)
                log.exception("a wave failed")
                for job in wave:
                    if job.done_rows < job.rows:
                        job.send(("error", RequestError(None, f"generation failed: {error}", status=500)))

    def _run(self, jobs: list[Job], alone: bool = False) -> None:
        """One wave: every row of ``jobs`` through the pool; a failing request fails alone."""
        rows = [(job, k) for job in jobs for k in range(job.rows)]
        positions = {id(job): [i for i, (j, _) in enumerate(rows) if j is job] for job in jobs}
        try:
            built = {id(job): job.stack.build(self.model, positions[id(job)], len(rows)) for job in jobs}
        except (OSError, ValueError) as error:  # a `from` file changed or vanished since the request was checked
            return self._split(jobs, error, alone)
        texts = [RowText(self.model.tokenizer, job.stops, job.stream, _text_sender(job, k), job.cancelled.is_set)
                 for job, k in rows]
        tap = ServerTap(texts)
        blocks = [block for job in jobs for part in built[id(job)] for block in part.values()]
        stacks = [[*built[id(job)][0].values(), *built[id(job)][1].values(), tap] for job, _ in rows]
        first, started = jobs[0], False
        with self._wake:
            open_slots, self._contended = self._contended or len(rows) >= self.slots, False
        late_rows = self._late_rows(jobs, rows, built, tap) if open_slots else None

        def finished(row: FinishedRow) -> None:
            job, k = rows[row.row]
            interventions, probes = built[id(job)]
            record = summarise_row(row, interventions, probes, self.model.tokenizer).record
            reason = FINISH_REASONS.get(row.stop_reason, "stop")
            text = cut_at_stop(row.text, job.stops)
            if job.cancelled.is_set():
                self.stats["cancelled_rows"] += 1
            self.stats["finished_rows"] += 1
            surgery_entry = {"index": k, "stop_reason": row.stop_reason, "fired": _finite(record["fired"]),
                             "probes": _finite(record["probes"])}
            job.send(("row", RowResult(k, text, list(row.token_ids), row.prompt_length, reason, surgery_entry)))
            job.done_rows += 1
            if job.done_rows == job.rows:
                job.send(("done",))

        try:
            with surgery.trace(self.model, *blocks, tap) as tr:  # binds every block: a bad one raises here
                started = True
                self._tap = tap
                self.stats["waves"] += 1
                for job in jobs:
                    job.send(("started",))
                tr.generate([job.prompts[k // job.n] for job, k in rows], [job.max_tokens for job, _ in rows],
                            stacks=stacks, batch_size=self.slots, do_sample=not first.greedy,
                            temperature=first.temperature if not first.greedy else 1.0, top_p=first.top_p, seed=0,
                            row_keys=[job.row_key(k) for job, k in rows], shared_keys=True, on_row=finished,
                            cache=self.cache, progress=False, late_rows=late_rows)
        except Exception as error:  # noqa: BLE001 (a request's blocks may raise anything; the server goes on)
            if started:
                log.exception("a wave failed while decoding")
                failure = RequestError(None, f"generation failed: {type(error).__name__}: {error}", status=500)
                for job in jobs:
                    if job.done_rows < job.rows:
                        job.send(("error", failure))
            else:
                self._split(jobs, error, alone)
        finally:
            self._tap = None

    def _late_rows(self, jobs: list[Job], rows: list, built: dict, tap: ServerTap) -> LateRows | None:
        """Requests that join this wave while it runs (the module docstring says which may)."""
        if any(job.stack.answers for job in jobs):  # a probe's answers are one per row of the wave, fixed at its start
            return None
        if self.cache == "static":  # the cache is allocated for the wave's own rows: late ones must fit it
            capacity = max(job.max_tokens for job in jobs)
            bound = max(len(prompt) + job.max_tokens for job in jobs for prompt in job.prompts)
        else:
            capacity, bound = self.max_tokens, self.model.max_context or 2**31 - 1
        sampling, carried = jobs[0].sampling, {_signature(job.stack): job for job in list(jobs)}
        carried.setdefault((), None)

        def take(free: int) -> list[LateRow]:
            joined = []
            with self._wake:
                for job in list(self.queue):
                    fits = job.max_tokens <= capacity and all(len(p) + job.max_tokens <= bound for p in job.prompts)
                    signature = None if job.stack.answers else _signature(job.stack)
                    if job.sampling != sampling or signature not in carried or not fits or job.rows > free:
                        continue
                    if job.cancelled.is_set():
                        self.queue.remove(job)
                        continue
                    self.queue.remove(job)
                    jobs.append(job)  # the wave's own now: a failure mid-run reaches it too
                    free -= job.rows
                    template = carried[signature]
                    built[id(job)] = built[id(template)] if template is not None else ({}, {})
                    stack = [*built[id(job)][0].values(), *built[id(job)][1].values(), tap]
                    for k in range(job.rows):
                        rows.append((job, k))
                        tap.rows.append(RowText(self.model.tokenizer, job.stops, job.stream, _text_sender(job, k),
                                                job.cancelled.is_set))
                        joined.append(LateRow(job.prompts[k // job.n], job.max_tokens, job.row_key(k), stack))
                    self.stats["joined_late"] += 1
                    job.send(("started",))
            return joined

        return LateRows(take, capacity, bound)

    def _split(self, jobs: list[Job], error: Exception, alone: bool) -> None:
        """A wave that would not start: alone, its request gets a 400; else each request runs alone."""
        if alone:
            jobs[0].send(("error", _blame(self.model, jobs[0], error)))
            return
        for job in jobs:
            self._run([job], alone=True)


def _signature(stack: RequestStack) -> tuple:
    """What makes two requests' blocks the same: each block's type, config and file (by content)."""
    return tuple(json.dumps(spec.to_dict(), sort_keys=True) for spec in (*stack.interventions, *stack.probes))


def _text_sender(job: Job, index: int) -> Callable[[str], None]:
    return lambda piece: job.send(("text", index, piece))


def _blame(model, job: Job, error: Exception) -> RequestError:
    """The 400 for a request whose blocks would not start, naming the first block that fails alone."""
    param = None
    try:
        interventions, probes = job.stack.build(model, list(range(job.rows)), job.rows)
        specs = [*job.stack.interventions, *job.stack.probes]
        for spec, block in zip(specs, [*interventions.values(), *probes.values()]):
            try:
                with surgery.trace(model, block):
                    pass
            except Exception as alone:  # noqa: BLE001
                param, error = spec.field, alone
                break
    except (OSError, ValueError) as built:
        error = built
    return RequestError(param, f"the model refused this request's blocks: {error}")


def _finite(value):
    """``value`` with NaN and infinities as None (JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value
