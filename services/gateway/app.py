"""The gateway: Cumulus's front door.

It answers the request/reply API (a NATS micro service under `cumulus.api.<user>.<op>`: the
user is the subject's token, which NATS permissions tie to the caller's identity), validates
submissions with the seed's rules and the operator's policy, takes code packages in
(services/gateway/objects.py), replays a job's events to its owner (services/gateway/watch.py),
publishes JobSubmitted and CancelRequested, and keeps the job table (a projection of `jobs.>`)
to answer status queries.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
import nats.micro

from services.gateway import policy as checks
from services.gateway import watch as watching
from services.gateway.objects import CodeStore, UploadRequest
from services.gateway.secrets import MAX_SECRETS, SecretStore, check_name
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
from shared.policy import policy_for
from shared.service import ConsumerSpec, EventService
from shared.telemetry import COLD_START, new_trace
from shared.views import JobStatus

log = logging.getLogger(__name__)

VERSION = "0.1.0"

CATCH_UP_S = 2.0
"""How long a status query waits for the job table to reach the job's newest event."""


class Gateway(EventService[JobTable]):
    name = "gateway"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._micro: Any = None
        self._code: CodeStore | None = None
        self._secrets: SecretStore | None = None
        self.started_at = time.time()

    def new_state(self) -> JobTable:
        return JobTable()

    def consumers(self) -> list[ConsumerSpec]:
        # Every job event, so the tracked sequence tells whether a job's newest event is
        # applied; log batches are skipped without decoding.
        return [ConsumerSpec(subjects.JOBS_STREAM, "gateway", ["jobs.>"])]

    def ignore(self, subject: str) -> bool:
        return subject.endswith((".log", ".result", ".cancel"))

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
        assert self.js is not None
        self._code = CodeStore(self.js, self.config.limits)
        for op, handler in (
            ("submit", self.submit),
            ("status", self.status),
            ("cancel", self.cancel),
            ("jobs", self.list_jobs),
            ("workers", self.list_workers),
            ("health", self.health),
            ("watch", self.watch),
            ("upload", self.upload),
            ("secret_put", self.secret_put),
            ("secret_list", self.secret_list),
            ("secret_delete", self.secret_delete),
        ):
            await self._micro.add_endpoint(
                name=op, subject=subjects.api(op, "*"), handler=api.user_endpoint(handler)
            )
        await self._micro.add_endpoint(
            name="observe-watch",
            subject=f"{subjects.OBSERVE_PREFIX}.watch",
            handler=api.endpoint(self.observe_watch),
        )
        # A worker asks for the secrets of a job placed on it (only its own subject).
        await self._micro.add_endpoint(
            name="secrets-get",
            subject=subjects.secrets_request("*"),
            handler=api.worker_endpoint(self.secrets_get),
        )

    async def on_stop(self) -> None:
        if self._micro is not None:
            await self._micro.stop()
        if self._secrets is not None:
            self._secrets.close()

    # -- operations ------------------------------------------------------------------------

    async def submit(self, user: str, data: bytes) -> Any:
        req = api.decode_request(data, api.SubmitRequest)
        _same_user(user, req.user)
        job_id = req.job_id or ev.new_job_id()
        if not subjects.valid_token(job_id):
            raise InvalidArgument(f"Invalid job id {job_id!r}: use letters, digits, '-' and '_'")
        gpu = GpuRequest.parse(req.gpu)
        limits = self.config.limits
        duration = parse_duration(req.duration, limits.min_duration, limits.max_job_duration)
        rules = policy_for(self.config, user)
        env = checks.check_env(req.env)
        requirements = checks.check_requirements(req.requirements)
        priority = checks.check_priority(req.priority, rules, user)
        network = checks.check_network(req.network, rules, user)
        checks.check_share(gpu.tenths, rules, user)
        async with self.reading() as table:
            if existing := table.get(job_id):
                if existing.user != user:
                    raise PermissionDenied(f"Job {job_id} belongs to another user")
                return api.SubmitReply(job_id=job_id, status=existing.status)
            checks.check_waiting(table.waiting(user), rules, user)
        secret_names = await self._check_secrets(user, req.secrets, env)
        await self._check_code(user, req.code_ref, req.entrypoint)
        await self._admit(gpu)
        event = ev.JobSubmitted(
            event_id=f"submit-{job_id}",
            job_id=job_id,
            user=user,
            trace=new_trace(),
            spec=ev.JobSpec(
                code_ref=req.code_ref,
                entrypoint=req.entrypoint,
                requirements=requirements,
                gpu_tenths=gpu.tenths,
                duration_s=duration,
                priority=priority,
                env=env,
                network=network,
                secrets=secret_names,
            ),
        )
        assert self.js is not None
        await bus.publish(self.js, event)
        await self._published(event)
        return api.SubmitReply(job_id=job_id, status="SUBMITTED")

    # -- secrets -------------------------------------------------------------------------------

    @property
    def secret_store(self) -> SecretStore:
        """The users' secrets (services/gateway/secrets.py), opened at first use."""
        if self._secrets is None:
            self._secrets = SecretStore.open(self.config.data_path)
        return self._secrets

    async def _check_secrets(self, user: str, names: list[str], env: dict[str, str]) -> list[str]:
        """The job's secret names: valid, the user's own, none also in its env."""
        if not names:
            return []
        if len(names) > MAX_SECRETS:
            raise InvalidArgument(f"A job may name at most {MAX_SECRETS} secrets", field="secrets")
        unique = list(dict.fromkeys(check_name(name) for name in names))
        for name in unique:
            if name in env:
                raise InvalidArgument(
                    f"{name} is both in the job's env and one of its secrets; the secret "
                    "would replace it: drop one of them",
                    field="secrets",
                )
        missing = await asyncio.to_thread(self.secret_store.missing, user, unique)
        if missing:
            raise InvalidArgument(
                f"Unknown secret {', '.join(missing)}: store it first "
                f"(`cumulus secrets set {missing[0]}` or client.set_secret)",
                field="secrets",
            )
        return unique

    async def secret_put(self, user: str, data: bytes) -> Any:
        req = api.decode_request(data, api.SecretPut)
        created = await asyncio.to_thread(self.secret_store.put, user, req.name, req.value)
        log.info(
            "secret stored",
            extra={"fields": {"user": user, "secret": req.name, "created": created}},
        )
        return {"name": req.name, "created": created}

    async def secret_list(self, user: str, data: bytes) -> Any:
        return api.SecretNames(names=await asyncio.to_thread(self.secret_store.names, user))

    async def secret_delete(self, user: str, data: bytes) -> Any:
        req = api.decode_request(data, api.SecretRef)
        await asyncio.to_thread(self.secret_store.delete, user, req.name)
        log.info("secret deleted", extra={"fields": {"user": user, "secret": req.name}})
        return {"name": req.name, "deleted": True}

    async def secrets_get(self, worker_id: str, data: bytes) -> Any:
        """The values of a job's secrets, for the worker it is placed on and nobody else."""
        req = api.decode_request(data, api.SecretsRequest)
        await self._catch_up(req.job_id)
        async with self.reading() as table:
            job = secrets_holder(table, worker_id, req.job_id)
        names = await self._secret_names(job)
        values = await asyncio.to_thread(self.secret_store.values, job.user, names)
        fields = {"job_id": job.job_id, "worker_id": worker_id, "secrets": names}
        log.info("secrets handed to the job's worker", extra={"fields": fields})
        return api.SecretsReply(secrets=values)

    async def _secret_names(self, job: JobView) -> list[str]:
        """The secret names in the job's spec (its `submitted` event; the table keeps no
        spec)."""
        assert self.js is not None
        subject = subjects.job(job.user, job.job_id, "", "submitted")
        try:
            msg = await self.js.get_last_msg(subjects.JOBS_STREAM, subject)
        except nats.js.errors.NotFoundError:
            raise NotFound(f"Job {job.job_id}'s submission is no longer in the log") from None
        event = ev.decode(msg.data or b"")
        if not isinstance(event, ev.JobSubmitted):
            raise NotFound(f"Job {job.job_id}'s submission is not in the log")
        return list(event.spec.secrets)

    async def _check_code(self, user: str, code_ref: str, entrypoint: str) -> None:
        """The user stored this package (checked at upload) and it matches the entrypoint."""
        assert self._code is not None
        if not code_ref:
            raise InvalidArgument("Missing code package: upload it and pass its code_ref")
        if not subjects.valid_token(code_ref):
            raise InvalidArgument(f"Invalid code_ref {code_ref!r}", field="code_ref")
        kind = "function" if entrypoint == "function" else "script"
        checked = await self._code.kind(user, code_ref)
        if checked != kind:
            raise InvalidArgument(
                f"Code package is a {checked} package but entrypoint is {entrypoint!r}"
            )

    async def upload(self, user: str, data: bytes) -> Any:
        assert self._code is not None
        req = api.decode_request(data, UploadRequest)
        quota = policy_for(self.config, user).stored_bytes
        return await self._code.upload(user, req, quota)

    async def watch(self, user: str, data: bytes) -> Any:
        assert self.js is not None
        req = api.decode_request(data, watching.WatchRequest)
        return await watching.watch(self.js, user, req)

    async def observe_watch(self, data: bytes) -> Any:
        """Every user's events, for observers (only they may publish here)."""
        assert self.js is not None
        req = api.decode_request(data, watching.WatchRequest)
        return await watching.watch(self.js, "", req, observer=True)

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

    async def status(self, user: str, data: bytes) -> Any:
        ref = api.decode_request(data, api.JobRef)
        _same_user(user, ref.user)
        await self._catch_up(ref.job_id)
        async with self.reading() as table:
            return self._job(table, user, ref.job_id)

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

    async def cancel(self, user: str, data: bytes) -> Any:
        ref = api.decode_request(data, api.JobRef)
        _same_user(user, ref.user)
        async with self.reading() as table:
            job = self._job(table, user, ref.job_id)
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

    async def list_jobs(self, user: str, data: bytes) -> Any:
        req = api.decode_request(data, api.ListJobsRequest)
        _same_user(user, req.user)
        async with self.reading() as table:
            jobs = [
                job
                for job in table.jobs.values()
                if job.user == user and (not req.status or job.status in req.status)
            ]
        jobs.sort(key=lambda j: j.submitted_at, reverse=True)
        return {"jobs": jobs[: max(0, req.limit)]}

    async def list_workers(self, user: str, data: bytes) -> Any:
        assert self.nc is not None
        return await api.request(self.nc, "cumulus.scheduler.workers", {}, msgspec.Raw)

    async def health(self, user: str, data: bytes) -> Any:
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
    def _job(table: JobTable, user: str, job_id: str) -> JobView:
        """The user's job; another user's job is NOT_FOUND, as if it did not exist (its id
        tells the asker nothing)."""
        job = table.get(job_id)
        if job is None or job.user != user:
            raise NotFound(f"Job {job_id} not found")
        return job


PLACED = frozenset({JobStatus.SCHEDULED, JobStatus.PARTITIONED, JobStatus.RUNNING})
"""A job in these states is placed on its view's worker_id (not waiting, not over)."""


def secrets_holder(table: JobTable, worker_id: str, job_id: str) -> JobView:
    """The job, if `worker_id` may have its secrets: it is placed there now and not over.

    Any other asker is PERMISSION_DENIED alike (whether the job exists or not), so a worker
    learns nothing about jobs that are not its own."""
    job = table.get(job_id)
    if job is None or job.worker_id != worker_id or job.status not in PLACED:
        raise PermissionDenied(
            f"Job {job_id} is not running on {worker_id}: a worker gets the secrets of its "
            "own placed jobs only"
        )
    return job


def _same_user(user: str, claimed: str) -> None:
    """A request may name its user only if it is the caller (older clients send it)."""
    if claimed and claimed != user:
        raise PermissionDenied(
            f"You are {user!r}; a request cannot act for {claimed!r} (your credentials say "
            "who you are)"
        )
