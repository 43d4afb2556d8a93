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
from collections import Counter
from collections.abc import Iterable
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
import nats.micro

from services.gateway import history, maps
from services.gateway import policy as checks
from services.gateway import snapshot as snapshots
from services.gateway import watch as watching
from services.gateway.objects import CodeStore, UploadRequest
from services.gateway.secrets import MAX_SECRETS, SecretStore, check_name
from services.gateway.state import TERMINAL, JobTable, JobView
from shared import api, bus, images, labels, metrics, subjects, tracing, volumes
from shared import events as ev
from shared.errors import (
    ApiUnreachable,
    CumulusError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
    shown,
)
from shared.gpu import GpuRequest, parse_duration
from shared.policy import UserPolicy, policy_for
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
        self._maps: dict[str, str] = {}
        """Warm maps whose input queue is open: job id -> user (services/gateway/maps.py)."""
        self._code_of: dict[str, str] = {}
        """Job id -> its package's object name, for the jobs submitted since this gateway
        started reading (replayed or live) that have not ended: a large package is released
        when the last of them ends (`_release_code`)."""
        self.started_at = time.time()

    def new_state(self) -> JobTable:
        return JobTable()

    # Retention (shared/service.py): the table, less the jobs that ended long ago, is
    # snapshotted; those jobs are answered from the job stream (`_find`).
    def snapshot(self) -> bytes | None:
        return snapshots.encode(self.state)

    def restore(self, data: bytes) -> None:
        self.state = snapshots.decode(data)

    def compact(self, now: float) -> None:
        snapshots.compact(self.state, now, self.config.retention.forget_after_s)

    def consumers(self) -> list[ConsumerSpec]:
        # Every job event, so the tracked sequence tells whether a job's newest event is
        # applied; log batches are skipped without decoding.
        return [ConsumerSpec(subjects.JOBS_STREAM, "gateway", ["jobs.>"])]

    def ignore(self, subject: str) -> bool:
        return subject.endswith(".cancel")  # worker-directed; the table tracks none of it

    def fence(self) -> int:
        """The newest scheduler epoch seen: the table ignores older stamped decisions."""
        return self.state.epoch

    def apply(self, event: Any) -> None:
        # Counted live only (not replayed), on a job's change of status: an event read back
        # from the stream after this gateway applied it changes nothing and counts nothing.
        counted = self.ready.is_set() and isinstance(event, ev.JobSubmitted | ev.Terminal)
        was = self._status_of(event.job_id) if counted else None
        self.state.apply(event)
        if counted:
            self._count(event, was)
        if isinstance(event, ev.Terminal) and event.job_id in self._maps and self.ready.is_set():
            user = self._maps.pop(event.job_id)
            self.spawn(self._close_map(user, event.job_id), name=f"close-map-{event.job_id}")
        self._track_code(event)
        if isinstance(event, ev.JobStarted) and self.ready.is_set():  # live, not replayed
            job = self.state.get(event.job_id)
            if job is not None:
                metrics.observe(COLD_START, event.ts - job.submitted_at, event.trace)

    def _track_code(self, event: Any) -> None:
        if isinstance(event, ev.JobSubmitted):
            self._code_of[event.job_id] = subjects.code_object(event.user, event.spec.code_ref)
        elif isinstance(event, ev.Terminal):
            job = self.state.get(event.job_id)
            if job is not None and job.status not in TERMINAL:
                return  # an older attempt's end: the job goes on
            name = self._code_of.pop(event.job_id, None)
            code = self._code
            if name and code is not None and name in code.large and self.ready.is_set():
                self.spawn(self._release_code(name), name=f"release-{name[-12:]}")

    async def _release_code(self, name: str) -> None:
        """Delete a large package once no job uses it (retention.large_code_bytes), after a
        grace in which a resubmit reuses it. Kept when a job this gateway cannot account for
        (live before its snapshot) might use it: the TTL removes it then."""
        await asyncio.sleep(self.config.retention.large_code_grace_s)
        async with self.reading() as table:
            live = [j for j, job in table.jobs.items() if job.status not in TERMINAL]
        if any(self._code_of.get(job_id, "") in ("", name) for job_id in live):
            return
        assert self._code is not None
        if await self._code.release(name):
            log.info("released large code package", extra={"fields": {"object": name}})

    def _status_of(self, job_id: str) -> JobStatus | None:
        job = self.state.get(job_id)
        return None if job is None else job.status

    def _count(self, event: ev.JobSubmitted | ev.Terminal, was: JobStatus | None) -> None:
        """cumulus_jobs_submitted_total and _finished_total, and the result's delivery."""
        now = self._status_of(event.job_id)
        if now is None or now == was:
            return
        if was is None:
            metrics.JOBS_SUBMITTED.inc()
        elif now in TERMINAL:
            metrics.JOBS_FINISHED.labels(now.lower()).inc()
            metrics.observe(metrics.RESULT_DELIVERY, time.time() - event.ts, event.trace)

    def gauges(self) -> Iterable[metrics.GaugeValue]:
        """Jobs the table holds by state (shared/metrics.py), every state, zeros too."""
        yield from super().gauges()
        counts = Counter(job.status for job in list(self.state.jobs.values()))
        for status in JobStatus:
            yield ("cumulus_jobs", (status.lower(),), counts.get(status, 0))

    async def on_start(self) -> None:
        assert self.nc is not None
        self._micro = await nats.micro.add_service(
            self.nc,
            name="cumulus-gateway",
            version=VERSION,
            description="Cumulus job API: submit, status, cancel, jobs, workers, health",
        )
        assert self.js is not None
        self._code = CodeStore(
            self.js,
            self.config.limits,
            self.config.retention.code_ttl_s,
            self.config.instance,
            spool=self.db_path.with_suffix(".uploads"),
            large_bytes=self.config.retention.bytes_of("large_code_bytes"),
        )
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
        if self.config.instance:
            # A replica spools an upload's chunks on its disk: the uploader sends the
            # chunks after the first to this replica's own subject (objects.UploadReply).
            await self._micro.add_endpoint(
                name="upload-here",
                subject=subjects.api(f"upload.{self.config.instance}", "*"),
                handler=api.user_endpoint(self.upload),
            )
        await self._micro.add_endpoint(
            name="observe-watch",
            subject=f"{subjects.OBSERVE_PREFIX}.watch",
            handler=api.endpoint(self.observe_watch),
        )
        await self._micro.add_endpoint(
            name="observe-jobs",
            subject=f"{subjects.OBSERVE_PREFIX}.jobs",
            handler=api.endpoint(self.observe_jobs),
        )
        # A worker asks for the secrets of a job placed on it (only its own subject).
        await self._micro.add_endpoint(
            name="secrets-get",
            subject=subjects.secrets_request("*"),
            handler=api.worker_endpoint(self.secrets_get),
        )

        # Warm maps' queues, found again; those of maps that ended meanwhile are closed.
        self._maps = await maps.open_queues(self.js)
        async with self.reading() as table:
            ended = [j for j in self._maps if (job := table.get(j)) and job.status in TERMINAL]
        for job_id in ended:
            self.spawn(self._close_map(self._maps.pop(job_id), job_id), name=f"close-map-{job_id}")

    async def _close_map(self, user: str, job_id: str) -> None:
        assert self.js is not None
        try:
            await maps.close_queue(self.js, user, job_id)
        except Exception as exc:
            log.warning(
                "could not close a warm map's input queue",
                extra={"fields": {"job_id": job_id, "error": str(exc)}},
            )

    async def on_stop(self) -> None:
        if self._micro is not None:
            await self._micro.stop()
        if self._secrets is not None:
            self._secrets.close()
        if self._code is not None:
            self._code.close()

    # -- operations ------------------------------------------------------------------------

    async def submit(self, user: str, data: bytes) -> Any:
        started = tracing.now()
        req = api.decode_request(data, api.SubmitRequest)
        _same_user(user, req.user)
        job_id = req.job_id or ev.new_job_id()
        if not subjects.valid_token(job_id):
            raise InvalidArgument(
                f"Invalid job id {job_id!r}: use letters, digits, '-' and '_', at most 64",
                field="job_id",
            )
        rules = policy_for(self.config, user)
        spec = self._spec(user, req, rules)
        async with self.reading() as table:
            existing = table.get(job_id)
        if existing is None and req.job_id:  # a repeated submit of a job that left memory
            existing = await self._from_stream(job_id)
        if existing is not None:
            if existing.user != user:
                raise PermissionDenied(f"Job {job_id} belongs to another user")
            return api.SubmitReply(job_id=job_id, status=existing.status)
        async with self.reading() as table:
            checks.check_waiting(table.waiting(user), rules, user)
        await self._check_secrets(user, spec)
        await self._check_code(user, spec.code_ref, spec.entrypoint)
        await self._admit(GpuRequest(spec.gpu_tenths))
        if spec.map is not None:  # its queue first: no input is ever without a reader
            assert self.js is not None
            await maps.open_queue(self.js, user, job_id)
            self._maps[job_id] = user
        event = ev.JobSubmitted(
            event_id=f"submit-{job_id}",
            job_id=job_id,
            user=user,
            trace=_job_trace(req.traceparent),
            spec=spec,
        )
        assert self.js is not None
        await bus.publish(self.js, event)
        await self._published(event)
        if tracing.enabled():
            _accepted(event, req.traceparent, started)
        return api.SubmitReply(job_id=job_id, status="SUBMITTED")

    def _spec(self, user: str, req: api.SubmitRequest, rules: UserPolicy) -> ev.JobSpec:
        """The job's spec from a submit: every field checked and bounded, and the whole
        within its budget, so that every event about the job fits on the bus (issue 11)."""
        gpu = GpuRequest.parse(req.gpu)
        limits = self.config.limits
        duration = parse_duration(req.duration, limits.min_duration, limits.max_job_duration)
        env = checks.check_env(req.env)
        requirements = checks.check_requirements(req.requirements)
        priority = checks.check_priority(req.priority, rules, user)
        network = checks.check_network(req.network, rules, user)
        checks.check_share(gpu.tenths, rules, user)
        spec = ev.JobSpec(
            code_ref=_code_ref(req.code_ref),
            entrypoint=checks.check_entrypoint(req.entrypoint),
            requirements=requirements,
            gpu_tenths=gpu.tenths,
            duration_s=duration,
            priority=priority,
            env=env,
            network=network,
            secrets=_secret_names(req.secrets, env),
            map=maps.check_map(req.map, req.entrypoint),
            name=labels.check_name(req.name),
            tags=labels.check_tags(req.tags),
            target=labels.check_target(req.target),
            volumes=volumes.check_request(req.volumes),
            retries=_retries(req.retries),
            image=images.check_allowed(
                req.image, self.config.policy.images, self.config.container.image, user
            ),
        )
        if spec.map is not None and spec.retries:
            raise InvalidArgument(
                "A warm map is not retried as a whole: its inputs are (`map(..., retries=N)`)",
                field="retries",
            )
        assert self.nc is not None
        return checks.check_spec(spec, self.nc.max_payload)

    # -- secrets -------------------------------------------------------------------------------

    async def secret_store(self) -> SecretStore:
        """The users' secrets (services/gateway/secrets.py), opened at first use."""
        if self._secrets is None:
            assert self.js is not None
            self._secrets = await SecretStore.open(
                self.js, self.config.data_path, self.config.nats.replicas
            )
        return self._secrets

    async def _check_secrets(self, user: str, spec: ev.JobSpec) -> None:
        """The job's secrets (valid names, `_secret_names`) are the user's own, and its
        environment with their values can start a process."""
        if not spec.secrets:
            return
        sizes = await (await self.secret_store()).sizes(user, spec.secrets)
        missing = [name for name in spec.secrets if name not in sizes]
        if missing:
            raise InvalidArgument(
                f"Unknown secret {', '.join(missing)}: store it first "
                f"(`cumulus secrets set {missing[0]}` or client.set_secret)",
                field="secrets",
            )
        checks.check_job_env(spec.env, sizes)

    async def secret_put(self, user: str, data: bytes) -> Any:
        req = api.decode_request(data, api.SecretPut)
        created = await (await self.secret_store()).put(user, req.name, req.value)
        log.info(
            "secret stored",
            extra={"fields": {"user": user, "secret": req.name, "created": created}},
        )
        return {"name": req.name, "created": created}

    async def secret_list(self, user: str, data: bytes) -> Any:
        return api.SecretNames(names=await (await self.secret_store()).names(user))

    async def secret_delete(self, user: str, data: bytes) -> Any:
        req = api.decode_request(data, api.SecretRef)
        check_name(req.name)
        await (await self.secret_store()).delete(user, req.name)
        log.info("secret deleted", extra={"fields": {"user": user, "secret": req.name}})
        return {"name": req.name, "deleted": True}

    async def secrets_get(self, worker_id: str, data: bytes) -> Any:
        """The values of a job's secrets, for the worker it is placed on and nobody else."""
        req = api.decode_request(data, api.SecretsRequest)
        await self._catch_up(req.job_id)
        async with self.reading() as table:
            job = secrets_holder(table, worker_id, req.job_id)
        names = await self._secret_names(job)
        values = await (await self.secret_store()).values(job.user, names)
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
        return await self._watch(user, data, observer=False)

    async def observe_watch(self, data: bytes) -> Any:
        """Every user's events, for observers (only they may publish here)."""
        return await self._watch("", data, observer=True)

    async def _watch(self, user: str, data: bytes, *, observer: bool) -> Any:
        assert self.js is not None
        req = api.decode_request(data, watching.WatchRequest)
        if req.job_id and not observer:
            req.job_id = await self._resolve(user, req.job_id)
        _subject(req.deliver, "deliver")
        if req.log_deliver:
            _subject(req.log_deliver, "log_deliver")
        if req.filter:
            _subject(req.filter, "filter")
        req.from_seq = max(1, min(req.from_seq, MAX_SEQ))
        req.from_log_seq = max(1, min(req.from_log_seq, MAX_SEQ))
        try:
            return await watching.watch(self.js, user, req, observer=observer)
        except (nats.errors.BadSubjectError, nats.js.errors.BadRequestError) as exc:
            raise InvalidArgument(f"The bus refused this watch: {exc}") from None

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
        job_id = await self._resolve(user, ref.job_id)
        await self._catch_up(job_id)
        return await self._find(user, job_id)

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
        job = await self._find(user, ref.job_id)
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
            was = self._status_of(event.job_id)
            table.apply(event)
            if isinstance(event, ev.JobSubmitted | ev.Terminal):
                self._count(event, was)

    async def list_jobs(self, user: str, data: bytes) -> Any:
        """The user's jobs in memory: every job not over, and those that ended within
        retention.forget_after_s (older ones still answer status, one by one)."""
        req = api.decode_request(data, api.ListJobsRequest)
        _same_user(user, req.user)
        return await self._listing({user}, req)

    async def observe_jobs(self, data: bytes) -> Any:
        """Every user's jobs (or `users`'), for observers and operators (only they may
        publish here), with the same filters."""
        req = api.decode_request(data, api.ListJobsRequest)
        for name in req.users:
            if not subjects.valid_token(name):
                raise InvalidArgument(f"Invalid user {shown(repr(name))}", field="users")
        return await self._listing(set(req.users) or None, req)

    async def _listing(self, users: set[str] | None, req: api.ListJobsRequest) -> Any:
        """The jobs in memory of `users` (None: everyone's) that pass the request's filters
        (status, name, tags, age), newest first, at most `limit`."""
        wanted = _statuses(req.status)
        if not 0 <= req.limit <= MAX_LIST_LIMIT:
            raise InvalidArgument(
                f"Invalid limit {shown(req.limit)}: from 0 to {MAX_LIST_LIMIT} jobs", field="limit"
            )
        if not 0 <= req.since_s <= MAX_SINCE_S:  # NaN fails too
            raise InvalidArgument(
                f"Invalid since_s {shown(req.since_s)}: from 0 to {MAX_SINCE_S:.0f} seconds",
                field="since_s",
            )
        if len(req.name) > labels.MAX_NAME:
            raise InvalidArgument(
                f"Invalid name filter {shown(repr(req.name))}: at most {labels.MAX_NAME} "
                "characters (a name, or a pattern such as train-*)",
                field="name",
            )
        oldest = time.time() - req.since_s if req.since_s else 0.0
        async with self.reading() as table:
            jobs = [
                job
                for job in table.jobs.values()
                if (users is None or job.user in users)
                and (not wanted or job.status in wanted)
                and job.submitted_at >= oldest
                and labels.name_matches(job.name, req.name)
                and labels.tags_match(job.tags, req.tags)
            ]
        jobs.sort(key=lambda j: j.submitted_at, reverse=True)
        assert self.nc is not None
        return _fitting(jobs[: req.limit], api.reply_budget(self.nc))

    async def list_workers(self, user: str, data: bytes) -> Any:
        """A page of the workers (`{after, limit}`; WorkerList.next says where the rest is)."""
        assert self.nc is not None
        query = api.decode_request(data, api.WorkersQuery)
        return await api.request(self.nc, "cumulus.scheduler.workers", query, msgspec.Raw)

    async def health(self, user: str, data: bytes) -> Any:
        assert self.nc is not None
        scheduler = "SERVING"
        try:
            # One worker's worth: a fleet's whole list may not fit one reply.
            page = api.WorkersQuery(limit=1)
            await api.request(self.nc, "cumulus.scheduler.workers", page, msgspec.Raw, timeout=1.0)
        except CumulusError:
            scheduler = "NOT_SERVING"
        return {
            "status": "SERVING",
            "version": VERSION,
            "uptime_s": round(time.time() - self.started_at, 3),
            "jobs": len(self.state.jobs),
            "scheduler": scheduler,
        }

    async def _find(self, user: str, job_id: str) -> JobView:
        """The user's job, from the table or, once it left memory, from the job stream;
        another user's job is NOT_FOUND, as if it did not exist (its id tells the asker
        nothing)."""
        job_id = await self._resolve(user, job_id)
        async with self.reading() as table:
            job = table.get(job_id)
        if job is None:
            job = await self._from_stream(job_id, user)
        if job is None or job.user != user:
            raise NotFound(f"Job {job_id} not found")
        return job

    async def _resolve(self, user: str, job_id: str) -> str:
        """The id `job_id` stands for: itself if a job has it, else the one job of `user`'s in
        memory whose id starts with it (a unique prefix, as `cumulus status j3f9` gives);
        several: INVALID_ARGUMENT; none: `job_id` as given (NOT_FOUND follows)."""
        if not job_id or self.state.get(job_id) is not None:
            return job_id  # the common case, without waiting for a batch being applied
        async with self.reading() as table:
            found = [
                job.job_id
                for job in table.jobs.values()
                if job.job_id.startswith(job_id) and job.user == user
            ]
        if len(found) > 1:
            raise InvalidArgument(
                f"ambiguous: {len(found)} jobs start with {shown(repr(job_id))}; give more of "
                "the job id",
                field="job_id",
            )
        return found[0] if found else job_id

    async def _from_stream(self, job_id: str, user: str = "*") -> JobView | None:
        """A job that ended long enough ago to have left the table (retention.forget_after_s),
        read back from its events in the job stream (services/gateway/history.py)."""
        assert self.js is not None
        try:
            return await history.job_from_stream(self.js, job_id, user)
        except (TimeoutError, nats.errors.Error) as exc:
            raise Unavailable(
                f"Job {job_id} is no longer in the gateway's memory and the job stream did not "
                f"answer for it ({type(exc).__name__}); retry shortly"
            ) from None


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


MAX_LIST_LIMIT = 10_000
"""Jobs one `jobs` request may ask for (a reply also stops where the bus's payload would)."""
MAX_SINCE_S = 10 * 365 * 86400.0
"""The oldest a `jobs` request's `since_s` may reach back (ten years)."""
MAX_SUBJECT = 256
"""Characters of a subject a request names (a watch's inbox or filter)."""
MAX_SEQ = 2**63 - 1
"""The highest stream sequence a watch may start from (JetStream's are 64-bit)."""


def _statuses(names: list[str]) -> set[JobStatus]:
    """A `jobs` request's status filter, each a JobStatus name."""
    try:
        return {JobStatus(name) for name in names}
    except ValueError:
        raise InvalidArgument(
            f"Invalid status filter {shown(names)}: use {', '.join(JobStatus)}", field="status"
        ) from None


def _fitting(jobs: list[JobView], budget: int) -> dict[str, Any]:
    """`{"jobs": [...]}` of the first of `jobs` whose encoding fits in `budget` bytes;
    `"truncated": true` when some were left out (a job's result may take 256 KiB)."""
    out: list[msgspec.Raw] = []
    used = 64  # the envelope
    for job in jobs:
        encoded = msgspec.json.encode(job)
        used += len(encoded) + 1
        if used > budget:
            return {"jobs": out, "truncated": True}
        out.append(msgspec.Raw(encoded))
    return {"jobs": out}


def _subject(value: str, field: str) -> str:
    """`value` if it is a NATS subject: dot-separated tokens without spaces or controls."""
    if (
        len(value) > MAX_SUBJECT
        or "" in value.split(".")
        or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in value)
    ):
        raise InvalidArgument(
            f"Invalid {field} {shown(repr(value))}: a NATS subject (tokens separated by '.', "
            f"no spaces), at most {MAX_SUBJECT} characters",
            field=field,
        )
    return value


def _code_ref(code_ref: str) -> str:
    """A submit's code_ref, if it can name a stored package (a subject token)."""
    if not code_ref:
        raise InvalidArgument("Missing code package: upload it and pass its code_ref")
    if not subjects.valid_token(code_ref):
        raise InvalidArgument(f"Invalid code_ref {code_ref!r}", field="code_ref")
    return code_ref


def _secret_names(names: list[str], env: dict[str, str]) -> list[str]:
    """The job's secret names, each once: valid, at most MAX_SECRETS, none also in its env."""
    if len(names) > MAX_SECRETS:
        raise InvalidArgument(
            f"A job may name at most {MAX_SECRETS} secrets ({len(names)} named)", field="secrets"
        )
    unique = list(dict.fromkeys(check_name(name) for name in names))
    for name in unique:
        if name in env:
            raise InvalidArgument(
                f"{name} is both in the job's env and one of its secrets; the secret "
                "would replace it: drop one of them",
                field="secrets",
            )
    return unique


def _retries(retries: int) -> int:
    """A job's `retries`, if 0-MAX_RETRIES (the SDK and the CLI check it too)."""
    if not 0 <= retries <= ev.MAX_RETRIES:
        raise InvalidArgument(
            f"Invalid retries {shown(retries)}: from 0 to {ev.MAX_RETRIES}", field="retries"
        )
    return retries


def _same_user(user: str, claimed: str) -> None:
    """A request may name its user only if it is the caller (older clients send it)."""
    if claimed and claimed != user:
        raise PermissionDenied(
            f"You are {user!r}; a request cannot act for {claimed!r} (your credentials say "
            "who you are)"
        )


def _job_trace(caller: str) -> str:
    """The job's trace context, carried by every event about it: the `accept` span's (a child
    of the caller's span when the SDK sent one) with tracing on, else the caller's or new."""
    if not tracing.enabled():
        return tracing.child_trace(caller)
    if tracing.valid(caller):
        return tracing.with_span(caller, tracing.new_span_id())
    return tracing.new_root("gateway accept")


def _accepted(event: ev.JobSubmitted, caller: str, started: int) -> None:
    """The gateway's span of the submit: from the request to the published `submitted`."""
    tracing.record(
        "gateway accept",
        caller,
        started,
        own=event.trace,
        kind="server",
        attributes={
            **tracing.messaging(bus.subject_of(event), event.event_id, "publish"),
            **tracing.job_attributes(event),
            "cumulus.gpu": event.spec.gpu_tenths / 10,
            "cumulus.entrypoint": event.spec.entrypoint,
            "cumulus.priority": event.spec.priority,
        },
    )
