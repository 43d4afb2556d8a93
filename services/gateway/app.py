"""The gateway: Cumulus's front door.

It answers the request/reply API (a NATS micro service under `cumulus.api.*`), validates
submissions with the seed's rules, checks code packages in the object store, publishes
JobSubmitted and CancelRequested, and keeps the job table (a projection of `jobs.>`) to answer
status queries.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
import nats.micro

from job_image.package import PackageError
from job_image.package import check as check_package
from services.gateway.state import TERMINAL, JobTable, JobView
from shared import api, bus, subjects
from shared import events as ev
from shared.errors import (
    ApiUnreachable,
    CumulusError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from shared.gpu import GpuRequest, parse_duration
from shared.service import ConsumerSpec, EventService
from shared.telemetry import COLD_START, new_trace

log = logging.getLogger(__name__)

VERSION = "0.1.0"

CHECKED_CACHE = 10_000
"""Code packages remembered as checked (by content address)."""
CATCH_UP_S = 2.0
"""How long a status query waits for the job table to reach the job's newest event."""


class Gateway(EventService[JobTable]):
    name = "gateway"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._micro: Any = None
        self._store: Any = None
        self._checked: dict[str, str] = {}
        """code_ref -> the kind of package it is, for packages that passed the checks."""
        self.started_at = time.time()

    def new_state(self) -> JobTable:
        return JobTable()

    def consumers(self) -> list[ConsumerSpec]:
        # Every job event, so the tracked sequence tells whether a job's newest event is
        # applied; log batches are skipped without decoding.
        return [ConsumerSpec(subjects.JOBS_STREAM, "gateway", ["jobs.>"])]

    def ignore(self, subject: str) -> bool:
        return subject.endswith((".log", ".cancel"))

    def apply(self, event: Any) -> None:
        self.state.apply(event)
        if isinstance(event, ev.JobStarted) and self.ready.is_set():  # live, not replayed
            job = self.state.get(event.job_id)
            if job is not None:
                COLD_START.observe(max(0.0, event.ts - job.submitted_at))

    async def on_start(self) -> None:
        assert self.nc is not None
        self._micro = await nats.micro.add_service(
            self.nc,
            name="cumulus-gateway",
            version=VERSION,
            description="Cumulus job API: submit, status, cancel, jobs, workers, health",
        )
        group = self._micro.add_group(name=subjects.API_PREFIX)
        for op, handler in (
            ("submit", self.submit),
            ("status", self.status),
            ("cancel", self.cancel),
            ("jobs", self.list_jobs),
            ("workers", self.list_workers),
            ("health", self.health),
        ):
            await group.add_endpoint(name=op, handler=api.endpoint(handler))

    async def on_stop(self) -> None:
        if self._micro is not None:
            await self._micro.stop()

    # -- operations ------------------------------------------------------------------------

    async def submit(self, data: bytes) -> Any:
        req = api.decode_request(data, api.SubmitRequest)
        if not subjects.valid_token(req.user):
            raise InvalidArgument(f"Invalid user {req.user!r}: use letters, digits, '-' and '_'")
        job_id = req.job_id or ev.new_job_id()
        if not subjects.valid_token(job_id):
            raise InvalidArgument(f"Invalid job id {job_id!r}: use letters, digits, '-' and '_'")
        gpu = GpuRequest.parse(req.gpu)
        limits = self.config.limits
        duration = parse_duration(req.duration, limits.min_duration, limits.max_job_duration)
        async with self.reading() as table:
            if existing := table.get(job_id):
                if existing.user != req.user:
                    raise PermissionDenied(f"Job {job_id} belongs to another user")
                return api.SubmitReply(job_id=job_id, status=existing.status)
        await self._check_code(req.code_ref, req.entrypoint)
        await self._admit(gpu)
        event = ev.JobSubmitted(
            event_id=f"submit-{job_id}",
            job_id=job_id,
            user=req.user,
            trace=new_trace(),
            spec=ev.JobSpec(
                code_ref=req.code_ref,
                entrypoint=req.entrypoint,
                requirements=list(req.requirements),
                gpu_tenths=gpu.tenths,
                duration_s=duration,
                priority=req.priority,
                env=dict(req.env),
            ),
        )
        assert self.js is not None
        await bus.publish(self.js, event)
        await self._published(event)
        return api.SubmitReply(job_id=job_id, status="SUBMITTED")

    async def _check_code(self, code_ref: str, entrypoint: str) -> None:
        """The package exists, is within limits, is safe to unpack and matches the entrypoint.

        Packages are content addressed, so a package checked once is remembered by name.
        """
        assert self.js is not None
        if not code_ref:
            raise InvalidArgument("Missing code package: upload it and pass its code_ref")
        kind = "function" if entrypoint == "function" else "script"
        checked = self._checked.get(code_ref)
        if checked is None:
            checked = await self._check_package(code_ref)
            if len(self._checked) >= CHECKED_CACHE:
                self._checked.pop(next(iter(self._checked)))
            self._checked[code_ref] = checked
        if checked != kind:
            raise InvalidArgument(
                f"Code package is a {checked} package but entrypoint is {entrypoint!r}"
            )

    async def _check_package(self, code_ref: str) -> str:
        assert self.js is not None
        if self._store is None:
            self._store = await self.js.object_store(subjects.CODE_BUCKET)
        store = self._store
        try:
            info = await store.get_info(code_ref)
        except (nats.js.errors.ObjectNotFoundError, nats.js.errors.NotFoundError):
            raise InvalidArgument(
                f"Code package {code_ref} not found in the object store; upload it first"
            ) from None
        limits = self.config.limits
        if (info.size or 0) > limits.max_code_bytes:
            raise InvalidArgument(
                f"Code package is {info.size} bytes; the limit is {limits.max_code_bytes}"
            )
        result = await store.get(code_ref)
        try:
            manifest = check_package(result.data or b"", limits.max_unpacked_bytes)
        except PackageError as exc:
            raise InvalidArgument(f"Invalid code package: {exc}") from None
        return str(manifest["kind"])

    async def _admit(self, gpu: GpuRequest) -> None:
        """Ask the scheduler whether the request can ever fit; if it is away, accept."""
        assert self.nc is not None
        try:
            await api.request(
                self.nc,
                "cumulus.scheduler.admit",
                api.SchedulerQuery(gpu_tenths=gpu.tenths),
                dict,
                timeout=1.0,
            )
        except ApiUnreachable:
            log.warning("scheduler did not answer the admission check; accepting the job")

    async def status(self, data: bytes) -> Any:
        ref = api.decode_request(data, api.JobRef)
        await self._catch_up(ref.job_id)
        async with self.reading() as table:
            return self._job(table, ref)

    async def _catch_up(self, job_id: str) -> None:
        """Read-your-writes: a client that saw an event of this job sees it in status too."""
        assert self.js is not None
        if not subjects.valid_token(job_id):
            return
        try:
            last = await self.js.get_last_msg(subjects.JOBS_STREAM, subjects.job_all(job_id))
        except nats.js.errors.NotFoundError:
            return
        await self.caught_up("gateway", last.seq or 0, CATCH_UP_S)

    async def cancel(self, data: bytes) -> Any:
        ref = api.decode_request(data, api.JobRef)
        async with self.reading() as table:
            job = self._job(table, ref)
            if job.status in TERMINAL or job.cancel_requested:
                return job
        event = ev.CancelRequested(
            event_id=f"cancel-{job.job_id}", job_id=job.job_id, user=job.user, trace=new_trace()
        )
        assert self.js is not None
        await bus.publish(self.js, event)
        await self._published(event)
        return job

    async def _published(self, event: ev.JobEvent) -> None:
        """Apply an event the gateway published itself, so its reply and the next status
        query see it at once; the stream copy applied later changes nothing."""
        async with self.reading() as table:
            table.apply(event)

    async def list_jobs(self, data: bytes) -> Any:
        req = api.decode_request(data, api.ListJobsRequest)
        async with self.reading() as table:
            jobs = [
                job
                for job in table.jobs.values()
                if (not req.user or job.user == req.user)
                and (not req.status or job.status in req.status)
            ]
        jobs.sort(key=lambda j: j.submitted_at, reverse=True)
        return {"jobs": jobs[: max(0, req.limit)]}

    async def list_workers(self, data: bytes) -> Any:
        assert self.nc is not None
        return await api.request(self.nc, "cumulus.scheduler.workers", {}, msgspec.Raw)

    async def health(self, data: bytes) -> Any:
        assert self.nc is not None
        scheduler = "SERVING"
        try:
            await api.request(self.nc, "cumulus.scheduler.workers", {}, msgspec.Raw, timeout=1.0)
        except CumulusError:
            scheduler = "NOT_SERVING"
        return {
            "status": "SERVING",
            "version": VERSION,
            "uptime_s": round(time.time() - self.started_at, 3),
            "jobs": len(self.state.jobs),
            "scheduler": scheduler,
        }

    @staticmethod
    def _job(table: JobTable, ref: api.JobRef) -> JobView:
        job = table.get(ref.job_id)
        if job is None:
            raise NotFound(f"Job {ref.job_id} not found")
        if ref.user and job.user != ref.user:
            raise PermissionDenied(f"Job {ref.job_id} belongs to another user")
        return job
