"""The runner: starts each job once its partition is ready, streams its output, ends it.

Consumes only its worker's `partition_ready`, `cancel` and `revoked` events. For each job it
logs a Launching record (with the result nonce), starts the job idempotently through its
backend (process, Docker engine or Swarm: `services/runner/config.py`), emits JobStarted, then
watches: every output line becomes part of a JobLog event (batched, in order, the unterminated
last line included, read a bounded amount at a time), the duration is enforced
(DEADLINE_EXCEEDED), a cancel kills within the poll interval, a revoked placement is killed
without an outcome, and the exit becomes JobCompleted or JobFailed. After a crash it replays
its log, re-adopts running jobs from the backend and removes whatever the backend still holds
for jobs that are over.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections import OrderedDict
from typing import Any

import msgspec

from job_image.runner import end_marker, parse_frame
from services.runner import state as st
from services.runner.backend import Backend, Exit, Launch, Output
from services.runner.config import make_backend
from shared import events as ev
from shared import subjects
from shared.errors import deadline_exceeded
from shared.service import ConsumerSpec, EventService
from shared.telemetry import JOB_DURATION, WORKER_ACTIVE_JOBS, child_trace

log = logging.getLogger(__name__)

PACKAGE_CACHE_BYTES = 64 * 1024 * 1024
"""Code packages kept in memory by content address (repeated and retried jobs reuse them)."""
MAX_INLINE_RESULT = 256 * 1024
"""A larger result goes to the object store and the event carries its name."""
MAX_LINES_PER_EVENT = 1000
MAX_BYTES_PER_EVENT = 256 * 1024
POLL_FAST_S = 0.005
POLL_SLOW_S = 0.05
"""Output is read this often (and at once when a backend reports the job's exit)."""


class Runner(EventService):
    name = "runner"

    def __init__(self, *args: Any, backend: Backend | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.worker_id = self.config.worker_id
        self.state = st.RunnerState(self.worker_id)
        root = self.config.data_path / f"runner-{self.worker_id}"
        self.ledger = root / "launches.log"
        self.backend: Backend = backend or make_backend(self.config, root, self.ledger)
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._starting: dict[str, asyncio.Task[None]] = {}
        self._store: Any = None
        self._packages: OrderedDict[str, bytes] = OrderedDict()
        self._package_bytes = 0

    @property
    def db_path(self) -> Any:
        return self.config.data_path / f"runner-{self.worker_id}.sqlite"

    def consumers(self) -> list[ConsumerSpec]:
        return [
            ConsumerSpec(
                subjects.JOBS_STREAM,
                f"runner-{self.worker_id}",
                subjects.job_events(
                    "partition_ready", "cancel", "revoked", worker_id=self.worker_id
                ),
            )
        ]

    def apply(self, event: Any) -> None:
        self.state.apply(event)

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
        for job_id, attempt in held:
            job = self.state.jobs.get(job_id)
            if job is None or job.status == "done" or job.attempt != attempt:
                await self.backend.cleanup(job_id, attempt)

    async def on_stop(self) -> None:
        tasks = [*self._watchers.values(), *self._starting.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        close = getattr(self.backend, "close", None)
        if close is not None:
            await close()

    async def reconcile(self) -> None:
        WORKER_ACTIVE_JOBS.set(len(self.state.active()))
        for job in self.state.active():
            if job.job_id in self._starting or job.job_id in self._watchers:
                continue
            if job.status in ("ready", "launching"):
                if job.cancel and job.status == "ready":
                    await self._end(
                        job,
                        ev.JobCancelled(
                            job_id=job.job_id,
                            user=job.user,
                            worker_id=self.worker_id,
                            message=job.cancel_reason or "cancelled by user",
                            trace=child_trace(job.trace),
                        ),
                    )
                    continue
                self._starting[job.job_id] = asyncio.create_task(self._start(job))
            elif job.status == "running":
                self._watchers[job.job_id] = asyncio.create_task(self._watch(job))

    # -- starting --------------------------------------------------------------------------

    async def _start(self, job: st.RunJob) -> None:
        try:
            # The package is fetched while the Launching record is committed: neither waits.
            fetch = asyncio.create_task(self._package(job.spec.code_ref))
            if job.status == "ready":
                await self.emit(
                    [],
                    internal=[
                        st.Launching(
                            job_id=job.job_id, attempt=job.attempt, nonce=secrets.token_hex(16)
                        )
                    ],
                )
            try:
                package = await fetch
                handle = await self.backend.start(
                    Launch(
                        job_id=job.job_id,
                        attempt=job.attempt,
                        package=package,
                        nonce=job.nonce,
                        env=self._env(job),
                        requirements=list(job.spec.requirements),
                    )
                )
            except Exception as exc:
                if job.revoked:
                    await self.backend.cleanup(job.job_id, job.attempt)
                    return
                log.exception("job failed to start", extra={"fields": {"job_id": job.job_id}})
                await self._end(
                    job,
                    ev.JobFailed(
                        job_id=job.job_id,
                        user=job.user,
                        worker_id=self.worker_id,
                        code="INTERNAL",
                        message=f"Failed to start the job on {self.worker_id}: {exc}",
                        trace=child_trace(job.trace),
                    ),
                )
                return
            if job.revoked:
                await self.backend.cleanup(job.job_id, job.attempt)
                return
            await self.emit(
                [
                    ev.JobStarted(
                        job_id=job.job_id,
                        user=job.user,
                        worker_id=self.worker_id,
                        backend=self.backend.name,
                        handle=handle,
                        attempt=job.attempt,
                        trace=child_trace(job.trace),
                    )
                ]
            )
        finally:
            self._starting.pop(job.job_id, None)
            self.wake()

    async def _package(self, code_ref: str) -> bytes:
        """The code package, from a small in-memory cache (packages are content addressed)."""
        assert self.js is not None
        if (cached := self._packages.get(code_ref)) is not None:
            self._packages.move_to_end(code_ref)
            return cached
        if self._store is None:
            self._store = await self.js.object_store(subjects.CODE_BUCKET)
        result = await self._store.get(code_ref)
        data = result.data or b""
        self._packages[code_ref] = data
        self._package_bytes += len(data)
        while self._package_bytes > PACKAGE_CACHE_BYTES and len(self._packages) > 1:
            _, dropped = self._packages.popitem(last=False)
            self._package_bytes -= len(dropped)
        return data

    def _env(self, job: st.RunJob) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k in ("PATH", "LANG", "LC_ALL", "TZ", "PYTHONPATH")
        }
        env.update(job.env)
        env.update(job.spec.env)
        env.update(
            {
                "PYTHONUNBUFFERED": "1",
                "CUMULUS_JOB_ID": job.job_id,
                "CUMULUS_WORKER_ID": self.worker_id,
                "CUMULUS_REQUIREMENTS": msgspec.json.encode(job.spec.requirements).decode(),
                "CUMULUS_MAX_UNPACKED": str(self.config.limits.max_unpacked_bytes),
            }
        )
        if self.config.container.wheelhouse and self.backend.name == "process":
            env["CUMULUS_WHEELHOUSE"] = self.config.container.wheelhouse
        return env

    # -- watching --------------------------------------------------------------------------

    async def _watch(self, job: st.RunJob) -> None:
        try:
            await self._watch_until_end(job)
        finally:
            self._watchers.pop(job.job_id, None)

    async def _watch_until_end(self, job: st.RunJob) -> None:
        out = self.backend.output(job.job_id, job.attempt, job.handle, job.nonce, dict(job.offsets))
        try:
            await self._follow(job, out)
        finally:
            out.close()

    async def _follow(self, job: st.RunJob, out: Output) -> None:
        deadline = job.started_at + job.spec.duration_s
        result: dict[str, Any] | None = None
        exit_: Exit | None = None
        ending: ev.Terminal | None = None
        held: list[ev.LogLine] = []
        """Lines after the result frame: logged with the outcome, so a restart re-reads the
        frame rather than resuming past it."""
        end_line = end_marker(job.nonce) if job.nonce else "\x00"
        idle = 0
        while True:
            if job.revoked:
                await self.backend.kill(job.job_id, job.attempt, job.handle)
                await self.backend.cleanup(job.job_id, job.attempt)
                return
            if exit_ is None and ending is None:
                exit_ = await self.backend.exited(job.job_id, job.attempt, job.handle)
                if exit_ is None and out.complete:
                    # The in-job runner wrote its result and closed both streams.
                    exit_ = Exit(0, "the job finished")
                elif exit_ is None and job.cancel:
                    await self.backend.kill(job.job_id, job.attempt, job.handle)
                    ending = ev.JobCancelled(
                        job_id=job.job_id,
                        user=job.user,
                        worker_id=self.worker_id,
                        message=job.cancel_reason or "cancelled by user",
                        trace=child_trace(job.trace),
                    )
                elif exit_ is None and time.time() >= deadline:
                    await self.backend.kill(job.job_id, job.attempt, job.handle)
                    ending = ev.JobTimedOut(
                        job_id=job.job_id,
                        user=job.user,
                        worker_id=self.worker_id,
                        message=deadline_exceeded(job.spec.duration_s).message,
                        trace=child_trace(job.trace),
                    )
            final = exit_ is not None or ending is not None
            got = await out.read(final)
            lines = held
            for name, text in got:
                if end_line in text:
                    text = text[: text.index(end_line)]
                    if not text:
                        continue
                if name == "stdout" and job.nonce and result is None:
                    framed = parse_frame(text, job.nonce)
                    if framed is not None:
                        before, result = framed
                        if before:
                            lines.append(ev.LogLine(name, before))
                        continue
                lines.append(ev.LogLine(name, text))
            if final and out.done:
                records = self._log_events(job, lines, out.cursor())
                if ending is None:
                    assert exit_ is not None
                    ending = await self._outcome(job, result, exit_.code, exit_.reason)
                await self._end(job, ending, records)
                return
            if result is not None:
                held = lines
                continue_now = bool(got)
            else:
                held = []
                records = self._log_events(job, lines, out.cursor())
                if records:
                    await self.emit(records[0], internal=records[1])
                continue_now = bool(got)
            if continue_now:
                idle = 0
                await asyncio.sleep(0)
                continue
            idle += 1
            await out.wait(POLL_FAST_S if idle < 5 else POLL_SLOW_S)

    def _log_events(
        self, job: st.RunJob, lines: list[ev.LogLine], offsets: dict[str, int]
    ) -> tuple[list[ev.Event], list[Any]] | None:
        """JobLog events for `lines` (batched, capped at max_log_bytes) and the new cursor."""
        if not lines and offsets == job.offsets:
            return None
        limit = self.config.worker.max_log_bytes
        out: list[ev.Event] = []
        batch: list[ev.LogLine] = []
        size = 0
        seq, sent, truncated = job.seq, job.sent_bytes, job.truncated

        def flush() -> None:
            nonlocal batch, size, seq
            if batch:
                out.append(
                    ev.JobLog(
                        job_id=job.job_id,
                        user=job.user,
                        worker_id=self.worker_id,
                        seq=seq,
                        lines=batch,
                        trace=job.trace,
                    )
                )
                seq += len(batch)
                batch, size = [], 0

        for line in lines:
            if truncated:
                break
            cost = len(line.text) + 8
            if sent + cost > limit:
                truncated = True
                line = ev.LogLine("stderr", f"[cumulus] output truncated after {sent} bytes")
            batch.append(line)
            size += cost
            sent += cost
            if len(batch) >= MAX_LINES_PER_EVENT or size >= MAX_BYTES_PER_EVENT:
                flush()
        flush()
        cursor = st.LogCursor(
            job_id=job.job_id, seq=seq, offsets=offsets, sent_bytes=sent, truncated=truncated
        )
        return out, [cursor]

    async def _outcome(
        self, job: st.RunJob, result: dict[str, Any] | None, code: int | None, reason: str
    ) -> ev.Terminal:
        common: dict[str, Any] = {
            "job_id": job.job_id,
            "user": job.user,
            "worker_id": self.worker_id,
            "trace": child_trace(job.trace),
        }
        runtime = max(0.0, time.time() - job.started_at)
        if result is not None and result.get("ok"):
            encoded = msgspec.json.encode(result)
            if len(encoded) > MAX_INLINE_RESULT:
                encoded = await self._store_result(job, encoded)
            return ev.JobCompleted(result=msgspec.Raw(encoded), runtime_s=runtime, **common)
        if result is not None:
            return ev.JobFailed(
                code="INTERNAL",
                message=f"{result.get('type')}: {result.get('message')}",
                traceback=str(result.get("traceback", "")),
                **common,
            )
        return ev.JobFailed(
            code="INTERNAL", message=f"Job ended without a result: {reason}", **common
        )

    async def _store_result(self, job: st.RunJob, encoded: bytes) -> bytes:
        """Put a result too large for an event in the object store; return its reference."""
        assert self.js is not None
        store = await self.js.object_store(subjects.RESULTS_BUCKET)
        name = f"{job.job_id}.{job.attempt}"
        await store.put(name, encoded)
        return msgspec.json.encode(
            {"ok": True, "stored": f"{subjects.RESULTS_BUCKET}/{name}", "size": len(encoded)}
        )

    async def _end(
        self,
        job: st.RunJob,
        ending: ev.Terminal,
        records: tuple[list[ev.Event], list[Any]] | None = None,
    ) -> None:
        logs, internal = records or ([], [])
        if job.revoked:  # given up while it ended: no outcome for this attempt
            await self.backend.cleanup(job.job_id, job.attempt)
            return
        await self.emit([*logs, ending], internal=internal)
        if job.started_at:
            JOB_DURATION.labels(ending.status.lower()).observe(
                max(0.0, time.time() - job.started_at)
            )
        await self.backend.cleanup(job.job_id, job.attempt)
