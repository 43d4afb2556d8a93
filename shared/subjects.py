"""The subject catalog: the public NATS API of Cumulus (also written out in docs/subjects.md).

Job history    jobs.<user>.<job_id>.<worker_id|_>.<event>   stream JOBS
Job output     logs.<user>.<job_id>.<worker_id>               stream LOGS (`log` events)
Large results  results.<user>.<job_id>.<worker_id>.<attempt>  stream RESULTS (`result` parts)
Worker facts   workers.<worker_id>.<event>                  stream WORKERS (latest per subject)
Request/reply  cumulus.api.<user>.<operation>               NATS micro service "cumulus-gateway"
Observers      cumulus.observe.<operation>                  the same service, every user's jobs
Secrets        cumulus.secrets.<worker_id>.get              a worker asks for its job's secrets
Consumers      cumulus.consumers.<worker_id>.create         a worker asks for its durable consumers
Election       jobs._._._.elected                     stream JOBS (`SchedulerElected`)
Lease          $KV.cumulus-scheduler.leader                 KV bucket: the active scheduler
Dead letters   cumulus.dead.<service>                       stream DEAD
Health         cumulus.health.<service>[.<instance>]        NATS micro service "cumulus-health"

The user is the second token so that a NATS permission on `jobs.<user>.>` lets a user read
only its own jobs. The worker is the fourth token so that a worker's consumer filters its own
work by subject alone (`jobs.*.*.<worker>.scheduled`): the server does the filtering, and 1,000
workers do not each read every event. `_` stands for "no worker yet". Output and large results
keep the same token positions in streams of their own, each with its own retention, so job
history stays small and a worker's consumers never read output.
"""

from __future__ import annotations

import re

from shared.events import TERMINAL_NAMES

JOBS_STREAM = "JOBS"
LOGS_STREAM = "LOGS"
RESULTS_STREAM = "RESULTS"
WORKERS_STREAM = "WORKERS"
DEAD_STREAM = "DEAD"
MAPIN_STREAM = "MAPIN"
"""Warm maps' inputs, a work queue: an input leaves it when a worker acknowledges its answer."""
MAP_EVENT = "map"
"""The last token of a warm map's answers: `results.<user>.<job>.<worker>.map`."""
CODE_BUCKET = "cumulus-code"
LEASE_BUCKET = "cumulus-scheduler"
"""The scheduler's key-value bucket: key `leader` holds the lease (services/scheduler/lease.py)."""
LEASE_KEY = "leader"

NO_WORKER = "_"
API_PREFIX = "cumulus.api"

_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")


def valid_token(value: str) -> bool:
    """True if `value` can stand as one subject token (user, job or worker id)."""
    return bool(_TOKEN.fullmatch(value)) and value != NO_WORKER


ELECTED = "jobs._._._.elected"
"""Where a scheduler that took the lease publishes its election marker (`SchedulerElected`):
in the job stream, so it takes its place among the decisions, and under `_`, which is no
user's token, so no user's `jobs.<user>.>` reads it. Every consumer of decisions filters it."""


def job(user: str, job_id: str, worker_id: str, event: str) -> str:
    return f"jobs.{user}.{job_id}.{worker_id or NO_WORKER}.{event}"


def job_all(job_id: str, user: str = "*") -> str:
    """Every event of one job, for a subscriber (its output and result parts not included)."""
    return f"jobs.{user}.{job_id}.>"


LOG_EVENT = "log"
RESULT_EVENT = "result"
OUTPUTS_EVENT = "outputs"
"""A kept `outputs/` folder's parts: `results.<user>.<job>.<worker>.<attempt>-outputs`."""
PREFIXES = {"jobs": JOBS_STREAM, "logs": LOGS_STREAM, "results": RESULTS_STREAM}
"""The first token of a job's subjects, and the stream that holds them."""


def log(user: str, job_id: str, worker_id: str) -> str:
    """Where a job's worker publishes its output (`log` events)."""
    return f"logs.{user}.{job_id}.{worker_id or NO_WORKER}"


def job_logs(job_id: str, user: str = "*") -> str:
    """Every output line of one job."""
    return f"logs.{user}.{job_id}.>"


def result(user: str, job_id: str, worker_id: str, attempt: int | str) -> str:
    """Where a job's worker publishes the parts of one attempt's large result."""
    return f"results.{user}.{job_id}.{worker_id or NO_WORKER}.{attempt}"


def outputs(user: str, job_id: str, worker_id: str, attempt: int) -> str:
    """Where a job's worker publishes the parts of one attempt's kept `outputs/` folder."""
    return f"results.{user}.{job_id}.{worker_id or NO_WORKER}.{attempt}-outputs"


def map_input(user: str, job_id: str) -> str:
    """Where a warm map's owner publishes its inputs (in chunks) and the end marker."""
    return f"mapin.{user}.{job_id}"


def map_output(user: str, job_id: str, worker_id: str) -> str:
    """Where the worker running a warm map publishes its answers (in the RESULTS stream)."""
    return f"results.{user}.{job_id}.{worker_id or NO_WORKER}.{MAP_EVENT}"


def map_consumer(job_id: str) -> str:
    """The durable consumer of a warm map's inputs: made by the gateway when the map is
    submitted, pulled by the runner of the worker that runs it, removed when the map ends."""
    return f"map-{job_id}"


def stream_of(subject: str) -> str:
    """The stream that holds `subject` (a subject or filter under jobs, logs or results);
    "" for any other."""
    return PREFIXES.get(subject.split(".", 1)[0], "")


def job_events(*names: str, worker_id: str = "*") -> list[str]:
    """Consumer filters for the named events of every job (on one worker, if given)."""
    return [f"jobs.*.*.{worker_id}.{name}" for name in names]


def terminal_events(worker_id: str = "*") -> list[str]:
    return job_events(*TERMINAL_NAMES, worker_id=worker_id)


def worker(worker_id: str, event: str) -> str:
    return f"workers.{worker_id}.{event}"


def api(operation: str, user: str = "default") -> str:
    """The subject of one API operation for one user: NATS permissions let a user publish
    only its own (`cumulus.api.<user>.>`), so the gateway knows who asks from the subject."""
    return f"{API_PREFIX}.{user}.{operation}"


def api_user(subject: str) -> str:
    """The user a request on `cumulus.api.<user>.<op>` came from."""
    return subject.split(".")[2]


OBSERVE_PREFIX = "cumulus.observe"


def secrets_request(worker_id: str) -> str:
    return f"cumulus.secrets.{worker_id}.get"


def consumer_request(worker_id: str) -> str:
    """Where a worker asks the scheduler for one of its durable consumers."""
    return f"cumulus.consumers.{worker_id}.create"


def code_object(user: str, code_ref: str) -> str:
    """A code package's object name in the code bucket: each user's packages are its own."""
    return f"{user}.{code_ref}"


def dead(service: str) -> str:
    return f"cumulus.dead.{service}"


HEALTH_PREFIX = "cumulus.health"


def health(service: str, instance: str = "") -> str:
    """Where one process's `service` answers whether it is alive and ready
    (shared/health.py); without `instance`, the roll call every instance answers."""
    return f"{HEALTH_PREFIX}.{service}.{instance}" if instance else f"{HEALTH_PREFIX}.{service}"


def parse_job_subject(subject: str) -> tuple[str, str, str, str]:
    """(user, job_id, worker_id, event) of a subject of a job: its history (`jobs.…`), its
    output (`logs.…`, event `log`), its result parts (`results.…`, event `result`) or its
    kept outputs' parts (`results.….<attempt>-outputs`, event `outputs`). ValueError for
    anything else, a `log`, `result` or `outputs` under `jobs.` included: each kind of event
    has its one place."""
    tokens = subject.split(".")
    head = tokens[0]
    own_place = (LOG_EVENT, RESULT_EVENT, OUTPUTS_EVENT)
    if head == "jobs" and len(tokens) == 5 and tokens[4] not in own_place:
        event = tokens[4]
    elif head == "logs" and len(tokens) == 4:
        event = LOG_EVENT
    elif head == "results" and len(tokens) == 5:
        event = OUTPUTS_EVENT if tokens[4].endswith("-outputs") else RESULT_EVENT
    else:
        raise ValueError(f"not a job subject: {subject!r}")
    _, user, job_id, worker_id = tokens[:4]
    return user, job_id, "" if worker_id == NO_WORKER else worker_id, event


def layout_of(event: str) -> str:
    """The subject layout an event of this name belongs under (for messages)."""
    if event == LOG_EVENT:
        return "logs.<user>.<job>.<worker>"
    if event == RESULT_EVENT:
        return "results.<user>.<job>.<worker>.<attempt>"
    if event == OUTPUTS_EVENT:
        return "results.<user>.<job>.<worker>.<attempt>-outputs"
    return "jobs.<user>.<job>.<worker>.<event>"
