"""The runner: starts each job once its partition is ready, streams its output, ends it.

Consumes only its worker's `partition_ready`, `cancel` and `revoked` events. For each job it
logs a Launching record (with the result nonce), starts the job idempotently through its
backend (process, Docker engine or Swarm: `services/runner/config.py`), emits JobStarted, then
watches: every output line becomes part of a JobLog event (batched, in order, the unterminated
last line included, read a bounded amount at a time), the duration is enforced
(DEADLINE_EXCEEDED), a cancel kills within the poll interval, a revoked placement is killed
without an outcome, and the exit becomes JobCompleted or JobFailed. After a crash it replays
its log, re-adopts running jobs from the backend and removes whatever the backend still holds
for jobs that are over. What to start, when a job is over and which events report it are
decided in `handlers.py`; this module is the wiring and the effects.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any, BinaryIO

import msgspec

from services.runner import handlers, mapfeed, outputs, results
from services.runner import lines as lines_mod
from services.runner import snapshot as snapshots
from services.runner import state as st
from services.runner.backend import Backend, Exit, Launch, Output
from services.runner.config import make_backend
from services.runner.jobdirs import PackageCache
from shared import api, bus, images, metrics, subjects, tracing
from shared import events as ev
from shared.config import Config
from shared.errors import ApiUnreachable
from shared.service import ConsumerSpec, EventService
from shared.telemetry import JOB_DURATION, WORKER_ACTIVE_JOBS

log = logging.getLogger(__name__)

MAX_INLINE_RESULT = 256 * 1024
"""A larger result travels in parts (services/runner/results.py); the event carries a digest."""
POLL_FAST_S = 0.005
POLL_SLOW_S = 0.05
"""Output is read this often (and at once when a backend reports the job's exit)."""
DISCARD_RETRY_S = 1.0
"""Pause before a revoked job whose cleanup failed is tried again."""
SECRETS_TRIES = 3
"""Asks for a job's secrets before giving up on it (the gateway may be restarting)."""
WITHHELD = ev.LogLine(
    "stderr",
    "[cumulus] the job's output is withheld: its secrets could not be fetched to mask them",
)


class Runner(EventService[st.RunnerState]):
    name = "runner"
    creates_streams = False

    def __init__(self, config: Config, *, backend: Backend | None = None) -> None:
        self.worker_id = config.worker_id
        super().__init__(config)
        root = self.config.data_path / f"runner-{self.worker_id}"
        self.ledger = root / "launches.log"
        self.ended: dict[str, float] = {}
        """When a compaction first found each job over (services/runner/snapshot.py)."""
        self.backend: Backend = backend or make_backend(self.config, root, self.ledger)
        self._busy: set[str] = set()
        """Jobs with a start or a watcher under way."""
        self._store: Any = None
        self._packages = PackageCache(root / "packages", self.config.worker.cache_bytes)
        """Code packages by content address (repeated and retried jobs reuse them)."""
        self._masks: dict[str, list[str] | None] = {}
        """Running jobs' secret values to mask in their output (memory only, never logged
        or stored); None: they could not be fetched, so the output is withheld."""

    def new_state(self) -> st.RunnerState:
        return st.RunnerState(self.worker_id)

    # Retention (shared/service.py): snapshots, and jobs over for a while leave memory.
    def snapshot(self) -> bytes | None:
        return snapshots.encode(self.state, self.ended)

    def restore(self, data: bytes) -> None:
        self.state, self.ended = snapshots.decode(data, self.worker_id)

    def compact(self, now: float) -> None:
        snapshots.compact(self.state, self.ended, now, self.config.retention.forget_after_s)

    @property
    def db_path(self) -> Path:
        return self.config.data_path / f"runner-{self.worker_id}.sqlite"

    def consumers(self) -> list[ConsumerSpec]:
        return [
            ConsumerSpec(
                subjects.JOBS_STREAM,
                f"runner-{self.worker_id}",
                [
                    *subjects.job_events(
                        "partition_ready", "cancel", "revoked", worker_id=self.worker_id
                    ),
                    subjects.ELECTED,
                ],
            )
        ]

    def apply(self, event: Any) -> None:
        self.state.apply(event)

    def fence(self) -> int:
        return self.state.epoch

    def decode(self, data: bytes) -> Any:
        return st.decode(data)

    async def on_start(self) -> None:
        # A crash between a job's end (or revocation) and its cleanup leaves its process or
        # container, service and files behind: the backend finds them by their labels.
        try:
            held = await self.backend.held()
        except Exception:
            log.exception("could not list what the backend holds; nothing reaped")
            return
        for job_id, attempt in handlers.leftovers(self.state, held):
            await self.backend.cleanup(job_id, attempt)

    async def on_stop(self) -> None:
        close = getattr(self.backend, "close", None)
        if close is not None:
            await close()

    async def reconcile(self) -> None:
        WORKER_ACTIVE_JOBS.set(len(self.state.active()))
        work = handlers.work(self.state, self._busy)
        for job in work.discard:
            self._effect(job, self._discard(job), "discard")
        for job in work.cancel:
            await self._end(job, handlers.cancelled(job, self.worker_id))
        for job in work.start:
            self._effect(job, self._launch(job), "start")
        for job in work.watch:
            self._effect(job, self._watch(job), "watch")

    def _effect(self, job: st.RunJob, coro: Any, kind: str) -> None:
        self._busy.add(job.job_id)

        def done(_: asyncio.Task[None]) -> None:
            self._busy.discard(job.job_id)
            self.wake()

        self.spawn(coro, name=f"{kind}-{job.job_id}").add_done_callback(done)

    # -- starting --------------------------------------------------------------------------

    async def _launch(self, job: st.RunJob) -> None:
        begun = tracing.now() if tracing.enabled() else 0
        taken = time.monotonic()
        # The package is fetched while the Launching record is committed: neither waits.
        fetch = asyncio.create_task(
            self._package(subjects.code_object(job.user, job.spec.code_ref))
        )
        if job.status == "ready":
            nonce = secrets.token_hex(16)
            launching = st.Launching(job_id=job.job_id, attempt=job.attempt, nonce=nonce)
            await self.emit([], internal=[launching])
        if job.revoked:  # before it started: a revoked attempt never runs
            fetch.cancel()
            await asyncio.gather(fetch, return_exceptions=True)
            await self._discard(job)
            return
        try:
            package = await fetch
            values = await self._secrets(job)
            self._masks[job.job_id] = handlers.secret_masks(values.values())
            images.refuse_without_containers(job.spec.image, self.backend.name)
            handle = await self.backend.start(
                Launch(
                    job_id=job.job_id,
                    attempt=job.attempt,
                    package=package,
                    nonce=job.nonce,
                    env=self._env(job, values),
                    requirements=list(job.spec.requirements),
                    network=job.spec.network,
                    volumes=dict(job.spec.volumes),
                    image=job.spec.image,
                )
            )
        except Exception as exc:
            if job.revoked:
                await self._discard(job)
                return
            log.exception("job failed to start", extra={"fields": {"job_id": job.job_id}})
            failed = handlers.start_failed(job, self.worker_id, exc)
            await self._end(job, handlers.mask_ending(failed, self._masks.get(job.job_id) or []))
            return
        if not job.revoked:
            started = handlers.started(job, self.worker_id, self.backend.name, handle)
            if begun:
                _trace_start(started, begun)
            await self.emit([started])
            metrics.observe(metrics.JOB_START, time.monotonic() - taken, job.trace)
        if job.revoked:  # revoked while it started (or while its start was being reported)
            await self._discard(job, handle)

    async def _discard(self, job: st.RunJob, handle: str = "") -> None:
        """A revoked attempt: kill it if it runs, remove what it left, report no outcome
        (DESIGN.md rule 9); the Discarded record lets a newer attempt of the job start."""
        if job.status == "done":
            return  # revoked before its Launching record: nothing was made
        self._masks.pop(job.job_id, None)
        handle = handle or job.handle
        if handle:
            try:
                await self.backend.kill(job.job_id, job.attempt, handle)
            except Exception:
                log.exception("could not kill a revoked job", extra={"fields": _fields(job)})
        try:
            await self.backend.cleanup(job.job_id, job.attempt)
        except Exception:
            # Not Discarded: reconciling tries again, after a pause rather than at once.
            log.exception("could not clean up a revoked job", extra={"fields": _fields(job)})
            await asyncio.sleep(DISCARD_RETRY_S)
            return
        await self.emit([], internal=[st.Discarded(job_id=job.job_id, attempt=job.attempt)])
        log.info("revoked job discarded", extra={"fields": _fields(job)})

    async def _package(self, code_ref: str) -> Path:
        """The code package (its object name, `<user>.<sha256>`) as a file of the on-disk
        cache (packages are content addressed), streamed there from the object store."""
        assert self.js is not None
        js = self.js

        async def fetch(into: BinaryIO) -> None:
            # A cluster electing a leader (it lost a server) answers "not yet": wait, not fail.
            if self._store is None:
                self._store = await bus.until_ready(
                    lambda: js.object_store(subjects.CODE_BUCKET), within=30.0
                )
            store = self._store

            async def get() -> Any:
                into.seek(0)
                into.truncate()
                return await store.get(code_ref, writeinto=into)

            await bus.until_ready(get, within=30.0)

        return await self._packages.get(code_ref, fetch)

    def _env(self, job: st.RunJob, secrets: dict[str, str] | None = None) -> dict[str, str]:
        wheelhouse = self.config.container.wheelhouse if self.backend.name == "process" else ""
        env = handlers.job_env(
            job,
            self.worker_id,
            os.environ,
            self.config.limits.max_unpacked_bytes,
            wheelhouse or "",
            secrets,
        )
        # The in-job runner stops writing a result at once past the maximum (checked here too).
        env["CUMULUS_MAX_RESULT_BYTES"] = str(self.config.worker.result_bytes)
        if tracing.enabled():  # the job's own spans: children of our `run` span
            unboxed = self.backend.name == "process" and self.config.worker.sandbox == "none"
            reach = job.spec.network or unboxed
            env.update(tracing.job_env(_run_span(job), reach, os.environ))
        return env

    async def _secrets(self, job: st.RunJob) -> dict[str, str]:
        """The values of the job's secrets, from the gateway (which hands them only to the
        worker the job is placed on). They live in memory: the job's environment and the
        masks of its output; never in an event, a log record or this runner's SQLite."""
        if not job.spec.secrets:
            return {}
        assert self.nc is not None
        body = api.SecretsRequest(job_id=job.job_id)
        subject = subjects.secrets_request(self.worker_id)
        for attempt in range(SECRETS_TRIES):
            try:
                reply = await api.request(self.nc, subject, body, api.SecretsReply)
                return reply.secrets
            except ApiUnreachable:
                if attempt + 1 == SECRETS_TRIES:
                    raise
                await asyncio.sleep(0.5 * (attempt + 1))
        return {}  # not reached

    async def _watch_masks(self, job: st.RunJob) -> None:
        """A job watched again after a restart: its secrets' masks, asked for again."""
        if job.job_id in self._masks or not job.spec.secrets:
            return
        try:
            values = await self._secrets(job)
        except Exception as exc:
            fields = {"job_id": job.job_id, "error": str(exc)}
            log.warning(
                "could not fetch the job's secrets; its output is withheld",
                extra={"fields": fields},
            )
            self._masks[job.job_id] = None
            return
        self._masks[job.job_id] = handlers.secret_masks(values.values())

    # -- watching --------------------------------------------------------------------------

    async def _watch(self, job: st.RunJob) -> None:
        await self._watch_masks(job)
        out = self.backend.output(job.job_id, job.attempt, job.handle, job.nonce, dict(job.offsets))
        feed = self._feed(job)
        try:
            await self._follow(job, out)
        finally:
            out.close()
            self._masks.pop(job.job_id, None)
            if feed is not None:
                feed.cancel()
                await asyncio.gather(feed, return_exceptions=True)

    def _feed(self, job: st.RunJob) -> asyncio.Task[None] | None:
        """A warm map's feed (services/runner/mapfeed.py), while its job process runs."""
        if job.spec.map is None:
            return None
        assert self.nc is not None
        assert self.js is not None
        feed = mapfeed.MapFeed(
            self.nc,
            self.js,
            user=job.user,
            job_id=job.job_id,
            attempt=job.attempt,
            worker_id=self.worker_id,
            inputs=job.spec.map.inputs,
            socket_path=mapfeed.socket_of(self.backend, job.job_id, job.attempt),
        )

        def ended(task: asyncio.Task[None]) -> None:
            if not task.cancelled() and task.exception() is not None:
                log.error(
                    "map feed failed; the job process gives up once no runner feeds it",
                    exc_info=task.exception(),
                    extra={"fields": _fields(job)},
                )

        task = asyncio.create_task(feed.run(), name=f"runner-map-{job.job_id}")
        task.add_done_callback(ended)
        return task

    async def _follow(self, job: st.RunJob, out: Output) -> None:
        """Deliver the job's output until it is over, then report how it ended."""
        frames = handlers.Frames(job.nonce)
        live = lines_mod.Live()
        end: Exit | ev.Terminal | None = None
        held: list[ev.LogLine] = []
        """Lines after the result frame: logged with the outcome, so a restart re-reads the
        frame rather than resuming past it."""
        idle = 0
        while True:
            if job.revoked:
                await self._discard(job)
                return
            if end is None:
                end = await self._end_of(job, out)
            got = await out.read(end is not None)
            lines = held + frames.lines(got)
            if end is not None and out.done:
                await self._finish(job, end, frames.result, lines, out.cursor())
                return
            held = lines if frames.result is not None else []
            if frames.result is None:
                partials = self._partials(job, out, live, got) if end is None else []
                await self._emit_logs(job, lines, out.cursor(), partials)
            if got:
                idle = 0
                await asyncio.sleep(0)
                continue
            idle += 1
            await out.wait(POLL_FAST_S if idle < 5 else POLL_SLOW_S)

    async def _end_of(self, job: st.RunJob, out: Output) -> Exit | ev.Terminal | None:
        """How the job ended (its exit), or the ending we gave it (killed), or None."""
        exit_ = await self.backend.exited(job.job_id, job.attempt, job.handle)
        if exit_ is not None:
            return exit_
        if out.complete:
            # The in-job runner wrote its result and closed both streams.
            return Exit(0, "the job finished")
        why = handlers.stop(job, time.time())
        if why is None or why is handlers.Stop.REVOKED:
            return None  # a revocation is handled before the next read
        await self.backend.kill(job.job_id, job.attempt, job.handle)
        return handlers.ending(job, self.worker_id, why)

    def _partials(
        self, job: st.RunJob, out: Output, live: lines_mod.Live, got: list[tuple[str, str]]
    ) -> list[ev.LogLine]:
        """The job's unterminated last lines to show live now (services/runner/lines.py Live).
        None for a job with secrets: a secret still being written could not be masked."""
        live.ended({name for name, _ in got})
        now = time.monotonic()
        if self._masks.get(job.job_id, []) != [] or not live.due(now):
            return []
        return [ev.LogLine(name, text) for name, text in live.look(out.partial(), now)]

    async def _emit_logs(
        self,
        job: st.RunJob,
        lines: list[ev.LogLine],
        cursor: Any,
        partials: list[ev.LogLine] | None = None,
    ) -> None:
        records = self._log_events(job, lines, cursor, partials or [])
        if records:
            await self.emit(records[0], internal=records[1])

    def _log_events(
        self,
        job: st.RunJob,
        lines: list[ev.LogLine],
        offsets: dict[str, int],
        partials: list[ev.LogLine] | None = None,
    ) -> handlers.LogRecords | None:
        masks = self._masks.get(job.job_id, [])
        if masks is None:
            lines = [WITHHELD] if lines and job.seq == 0 and not job.sent_bytes else []
        else:
            lines = handlers.mask_lines(lines, masks)
        records = handlers.log_events(
            job, self.worker_id, lines, offsets, self.config.worker.max_log_bytes, partials or []
        )
        if records is not None:
            metrics.count_logs(records[0])
        return records

    async def _finish(
        self,
        job: st.RunJob,
        end: Exit | ev.Terminal,
        result: dict[str, Any] | None,
        lines: list[ev.LogLine],
        cursor: dict[str, int],
    ) -> None:
        ended = tracing.now() if tracing.enabled() else 0
        kept, why_not = await self._keep_outputs(job)
        if why_not:
            lines = [*lines, ev.LogLine("stderr", why_not)]
        logs, internal = self._log_events(job, lines, cursor) or ([], [])
        own = isinstance(end, Exit)  # it ended by itself: a failure of its code may be retried
        if isinstance(end, Exit):
            end = await self._outcome(job, result, end)
        if kept is not None:
            end = msgspec.structs.replace(end, outputs=kept)
        await self._end(job, end, (logs, internal), ended, retryable=own)

    async def _keep_outputs(self, job: st.RunJob) -> tuple[ev.OutputsKept | None, str]:
        """The job's `outputs/` folder published in parts (services/runner/outputs.py), and
        what its end says of it; or why it was not kept (a line for the job's log)."""
        job_dir = self.backend.result_path(job.job_id, job.attempt).parent
        limit = self.config.worker.output_bytes
        try:
            kept = await outputs.keep(job, self.worker_id, job_dir, limit, self._publish_part)
        except outputs.NotKept as exc:
            return None, f"[cumulus] {exc}: not kept"
        except Exception as exc:
            log.warning(
                "could not keep the job's outputs",
                extra={"fields": {**_fields(job), "error": repr(exc)}},
            )
            return None, f"[cumulus] outputs/ could not be kept ({exc})"
        return kept, ""

    async def _outcome(
        self, job: st.RunJob, result: dict[str, Any] | None, exit_: Exit
    ) -> ev.Terminal:
        """The job's end. A result too large to travel in it is published first, in parts
        (services/runner/results.py), and the end carries their digest; one over
        `worker.max_result_bytes` fails the job (RESOURCE_EXHAUSTED)."""
        limit = self.config.worker.result_bytes
        runtime = max(0.0, time.time() - job.started_at)
        try:
            stored = await self._deliver(job, result, limit)
        except results.TooLarge as exc:
            ending: ev.Terminal = handlers.result_too_large(job, self.worker_id, exc.size, limit)
        except results.ResultError as exc:
            ending = handlers.result_failed(job, self.worker_id, exc.code, exc.message)
        else:
            ending = handlers.outcome(
                job, self.worker_id, result, exit_.reason, runtime, stored, limit
            )
        return handlers.mask_ending(ending, self._masks.get(job.job_id) or [])

    async def _deliver(
        self, job: st.RunJob, result: dict[str, Any] | None, limit: int
    ) -> bytes | None:
        """The envelope of the parts a large result went out as; None when it travels in its
        completed event (or there is none)."""
        if result is None or not result.get("ok"):
            return None
        if result.get("file"):  # the in-job runner's result file; the frame's size is a claim
            path = self.backend.result_path(job.job_id, job.attempt)
            shown = str(result.get("repr", ""))[:1000]
            return await results.store_file(
                job, self.worker_id, path, limit, self._publish_part, shown
            )
        encoded = msgspec.json.encode(result)
        if len(encoded) > limit:
            raise results.TooLarge(len(encoded))
        if len(encoded) <= MAX_INLINE_RESULT:
            return None
        return await results.store_bytes(job, self.worker_id, encoded, self._publish_part)

    async def _publish_part(
        self, part: ev.JobResultPart | ev.JobOutputsPart
    ) -> asyncio.Future[Any]:
        """Publish a result part straight to the bus (never through the log: it would hold
        the whole result); the future of its acknowledgement."""
        assert self.js is not None
        headers = bus.headers(part.event_id, part.trace)
        return await self.js.publish_async(
            bus.subject_of(part), ev.encode(part), headers=headers, wait_stall=results.ACK_S
        )

    async def _end(
        self,
        job: st.RunJob,
        ending: ev.Terminal,
        records: handlers.LogRecords | None = None,
        ended: int = 0,
        *,
        retryable: bool = False,
    ) -> None:
        """Report the job's end (`ended`: when its exit was seen, for its spans; 0: none);
        a failure of its own code (`retryable`) of a job with retries ends the attempt only
        (`handlers.attempt_failed`: the scheduler decides whether it runs again)."""
        logs, internal = records or ([], [])
        if job.revoked:  # given up while it ended: no outcome for this attempt
            await self._discard(job)
            return
        self._masks.pop(job.job_id, None)
        ending = handlers.fenced(ending, job)
        ending = handlers.counted(ending, job, internal)
        reported = handlers.attempt_failed(ending, job) if retryable else ending
        await self.emit([*logs, reported], internal=internal)
        if ended and job.started_at:
            _trace_end(job, ending, ended)
        if job.started_at:
            ran = time.time() - job.started_at
            JOB_DURATION.labels(ending.status.lower()).observe(max(0.0, ran))
            metrics.observe(metrics.JOB_RUN, ran, job.trace)
        await self.backend.cleanup(job.job_id, job.attempt)


def _fields(job: st.RunJob) -> dict[str, Any]:
    return {"job_id": job.job_id, "attempt": job.attempt}


def _run_span(job: st.RunJob) -> str:
    """The traceparent of the job's `run` span: fixed by the job's attempt, so the job's own
    process is its child from the start, and a restarted runner records the same span."""
    span_id = tracing.derived_span_id(job.trace, job.job_id, job.attempt, "run")
    return tracing.with_span(job.trace, span_id)


def _trace_start(started: ev.JobStarted, begun: int) -> None:
    """`runner start`: from the partition ready to the job's process or container running."""
    tracing.record(
        "runner start",
        started.trace,
        begun,
        tracing.ns(started.ts),
        attributes={
            **tracing.messaging(bus.subject_of(started), started.event_id, "publish"),
            **tracing.job_attributes(started),
            "cumulus.backend": started.backend,
            "cumulus.handle": started.handle,
        },
    )


def _trace_end(job: st.RunJob, ending: ev.Terminal, ended: int) -> None:
    """`runner run` (the job's execution, parent of the job's own spans) and `runner result
    delivery` (from its exit to its end event committed for publishing)."""
    attrs = tracing.job_attributes(ending)
    tracing.record(
        "runner run",
        job.trace,
        tracing.ns(job.started_at),
        ended,
        own=_run_span(job),
        attributes={**attrs, "cumulus.status": ending.status},
    )
    tracing.record(
        "runner result delivery",
        job.trace,
        ended,
        kind="producer",
        attributes={
            **tracing.messaging(bus.subject_of(ending), ending.event_id, "publish"),
            **attrs,
            "cumulus.status": ending.status,
        },
    )
