"""Warm maps: one job, `warm` job processes that load the function once, inputs through a queue.

`client.map(f, xs, warm=N)` submits one job whose spec says it is a map (`MapSpec`); its
worker starts N warm processes on the job's partition (job_image/warm.py). The inputs go, in
chunks, straight into the map's work queue (`mapin.<user>.<job>`, stream MAPIN), then an end
marker; the worker's runner pulls them (services/runner/mapfeed.py) and publishes each chunk's
answers to `results.<user>.<job>.<worker>.map`, which this client reads back through the
gateway's replay (so nothing is lost over a reconnect). Per input that is a share of a message
and a function call, not a job.

Every input has its own answer: its value, or its error (raised by `map`, or returned in
place with `return_exceptions=True`). A failing input does not end the map. An input whose
call raised is tried `retries` more times; one whose process died is tried again in a fresh
process (up to 3 times); one whose worker was lost is given out again to the job's next
attempt on another worker. An answer is unpickled only from a worker the job was placed on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import TYPE_CHECKING, Any

import cloudpickle
import msgspec

from cumulus._jobs import LOG_WAIT_S, AsyncJob, Logs, deliver_to, print_lines, replay
from cumulus._options import JobOptions
from cumulus._packaging import package_function
from shared import events as ev
from shared import subjects
from shared.errors import CumulusError, Internal, InvalidArgument, ResourceExhausted

if TYPE_CHECKING:
    from cumulus._client import AsyncClient

DEFAULT_WARM = 4
"""Warm processes when the caller lets the SDK choose (`warm=True`): at most one per input."""
MAX_CHUNK = 256
CHUNK_BYTES = 512 * 1024
"""A chunk of inputs is cut at this size (or MAX_CHUNK inputs), whichever comes first."""
END_HEADER = ev.MAP_END_HEADER


_CHUNK = msgspec.msgpack.Encoder()
_ANSWERS = msgspec.msgpack.Decoder(ev.MapAnswers)


class InputError(Internal):
    """One input's call raised (after its retries), or its process kept dying: `index` says
    which input; the message is the remote error's, `remote_traceback` its traceback."""

    fields = ("index", "remote_type")

    def __init__(
        self,
        message: str,
        *,
        index: int = -1,
        remote_type: str = "",
        job_id: str = "",
        remote_traceback: str = "",
    ) -> None:
        super().__init__(message, job_id=job_id, remote_traceback=remote_traceback)
        self.index = index
        self.remote_type = remote_type


def warm_count(warm: int | bool, inputs: int) -> int:
    """How many warm processes: the caller's number, or the SDK's choice (`True`)."""
    n = DEFAULT_WARM if warm is True else int(warm)
    if n < 1 or n > ev.MAX_WARM:
        raise InvalidArgument(f"warm must be 1-{ev.MAX_WARM} processes, got {warm}", field="warm")
    return max(1, min(n, inputs))


def chunk_size(inputs: int, warm: int) -> int:
    """Inputs per chunk: small maps one by one (lowest latency), large ones in chunks that
    still keep every warm process busy."""
    return max(1, min(MAX_CHUNK, inputs // (warm * 8)))


def _chunks(inputs: Sequence[tuple[Any, ...]], per: int) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    first, size = 0, 0
    batch: list[bytes] = []
    for index, args in enumerate(inputs):
        data = cloudpickle.dumps((args, {}))
        if batch and (len(batch) >= per or size + len(data) > CHUNK_BYTES):
            out.append((first, _CHUNK.encode(ev.MapChunk(first=first, inputs=batch))))
            first, batch, size = index, [], 0
        batch.append(data)
        size += len(data)
    if batch:
        out.append((first, _CHUNK.encode(ev.MapChunk(first=first, inputs=batch))))
    return out


def _error(index: int, payload: bytes) -> CumulusError:
    try:
        body = json.loads(payload)
    except ValueError:
        body = {"message": payload[:1000].decode("utf-8", "replace")}
    kind, traceback = str(body.get("type", "")), str(body.get("traceback", ""))
    message = f"input {index}: {kind}: {body.get('message', '')}"
    if traceback:
        message += f"\n\nRemote traceback:\n{traceback}"
    return InputError(message, index=index, remote_type=kind, remote_traceback=traceback)


async def answers(
    client: AsyncClient,
    func: Callable[..., Any],
    inputs: Sequence[tuple[Any, ...]],
    opts: JobOptions,
    *,
    warm: int,
    retries: int,
    logs: Logs,
) -> AsyncGenerator[tuple[int, Any], None]:
    """(index, value or CumulusError) of every input, as they come; the map's job is
    cancelled if the caller stops early."""
    if not inputs:
        return
    how, why = await client.how_to_package(opts.packaging)
    package = package_function(func, (), {}, opts.requirements, how)  # type: ignore[arg-type]
    spec = ev.MapSpec(warm=warm, inputs=len(inputs), retries=retries)
    job = await client.submit_package(package, opts, map_spec=spec, packaging_note=why)
    got: asyncio.Queue[tuple[int, Any] | BaseException] = asyncio.Queue()
    ended = asyncio.Event()
    follow = asyncio.create_task(_Follower(client, job, len(inputs), logs, got, ended).run())
    done = 0
    seen: set[int] = set()
    try:
        await _send(client, job.job_id, inputs, warm)
        while done < len(inputs):
            item = await got.get()
            if isinstance(item, BaseException):
                raise item
            index, value = item
            if index in seen or not 0 <= index < len(inputs):
                continue
            seen.add(index)
            done += 1
            if done == len(inputs) and logs:
                # Its output lines come with its end (the job's last, once they are all out).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ended.wait(), LOG_WAIT_S)
            yield index, value
    except BaseException:
        if done < len(inputs):
            with contextlib.suppress(Exception):
                await asyncio.shield(asyncio.wait_for(job.cancel(), 5))
        raise
    finally:
        follow.cancel()
        await asyncio.gather(follow, return_exceptions=True)


async def _send(
    client: AsyncClient, job_id: str, inputs: Sequence[tuple[Any, ...]], warm: int
) -> None:
    """The inputs into the map's queue, chunk by chunk (pipelined), then the end marker."""
    js = client.nc.jetstream()
    subject = subjects.map_input(client.user, job_id)
    pending = []
    try:
        for first, data in _chunks(inputs, chunk_size(len(inputs), warm)):
            headers = {"Nats-Msg-Id": f"{job_id}-in-{first}"}
            pending.append(await js.publish_async(subject, data, headers=headers, wait_stall=30))
        end = {"Nats-Msg-Id": f"{job_id}-end", END_HEADER: str(len(inputs))}
        pending.append(await js.publish_async(subject, b"", headers=end, wait_stall=30))
        await asyncio.wait_for(asyncio.gather(*pending), timeout=60)
    except Exception as exc:
        if "maximum bytes" in str(exc) or "maximum messages" in str(exc):
            raise ResourceExhausted(
                "The warm map input queue is full: send fewer or smaller inputs, or try later"
            ) from exc
        raise CumulusError.from_code(
            "UNAVAILABLE", f"could not queue the map's inputs: {exc}"
        ) from exc


class _Follower:
    def __init__(
        self,
        client: AsyncClient,
        job: AsyncJob,
        count: int,
        logs: Logs,
        got: asyncio.Queue[tuple[int, Any] | BaseException],
        ended: asyncio.Event,
    ) -> None:
        self.client, self.job, self.count, self.logs, self.got = client, job, count, logs, got
        self.ended = ended
        self.placed: set[str] = set()
        self.held: dict[str, list[ev.MapAnswers]] = {}
        """Answers of a worker not yet known to be placed (the events come another way)."""

    async def run(self) -> None:
        """Feed `got` with the answers of the job's placements, and its end if it ends early;
        `ended` is set once the job has ended (after its output)."""
        try:
            await asyncio.gather(self.events(), self.results())
        except Exception as exc:
            self.got.put_nowait(exc)

    def hand_out(self, batch: ev.MapAnswers) -> None:
        for index, ok, payload in batch.answers:
            try:
                value: Any = cloudpickle.loads(payload) if ok else _error(index, payload)
            except Exception as exc:
                value = CumulusError.from_code(
                    "INTERNAL", f"input {index}: its value cannot be unpickled here: {exc!r}"
                )
            self.got.put_nowait((index, value))

    async def events(self) -> None:
        async with contextlib.aclosing(self.job.events()) as stream:
            async for event in stream:
                if isinstance(event, ev.WorkerSelected):
                    self.placed.add(event.worker_id)
                    for batch in self.held.pop(event.worker_id, []):
                        self.hand_out(batch)
                elif isinstance(event, ev.JobLog):
                    print_lines(event, self.logs)
                elif isinstance(event, ev.JobCompleted):
                    self.ended.set()
                    return
                elif isinstance(event, ev.Terminal):
                    self.ended.set()
                    await asyncio.sleep(0.5)  # answers stored before the end may be on the way
                    self.got.put_nowait(_map_error(self.job, event, self.count))
                    return

    async def results(self) -> None:
        filter_ = f"results.{self.client.user}.{self.job.job_id}.>"

        async def start(inbox: str, last: dict[str, int]) -> dict[str, int]:
            body = {
                "filter": filter_,
                "deliver": deliver_to(inbox, subjects.RESULTS_STREAM),
                "from_seq": last.get(subjects.RESULTS_STREAM, 0) + 1,
            }
            reply = await self.client._call("watch", body, _WatchReply)
            return {reply.stream: reply.last_seq}

        answers = replay(self.client.nc, start, [subjects.RESULTS_STREAM])
        async with contextlib.aclosing(answers) as items:
            async for item in items:
                if item is None or not item[2].subject.endswith("." + subjects.MAP_EVENT):
                    continue
                worker = item[2].subject.split(".")[3]
                try:
                    batch = _ANSWERS.decode(item[2].data)
                except msgspec.DecodeError:
                    continue
                if worker in self.placed:
                    self.hand_out(batch)
                else:
                    self.held.setdefault(worker, []).append(batch)


class _WatchReply(msgspec.Struct, kw_only=True):
    last_seq: int = 0
    stream: str = subjects.RESULTS_STREAM


def _map_error(job: AsyncJob, event: ev.Terminal, count: int) -> CumulusError:
    from cumulus._jobs import job_error

    error = job_error(event)
    error.message = f"warm map {job.job_id} ended before all {count} inputs were answered: " + (
        error.message
    )
    return error


async def run_map(
    client: AsyncClient,
    func: Callable[..., Any],
    inputs: Sequence[tuple[Any, ...]],
    opts: JobOptions,
    *,
    warm: int | bool,
    retries: int,
    ordered: bool,
    return_exceptions: bool,
    logs: Logs,
    timeout: float | None,
) -> list[Any]:
    """The values of `func(*x)` for every x of `inputs` (see `AsyncClient.map`)."""
    n = warm_count(warm, len(inputs))
    if not 0 <= retries <= 10:
        raise InvalidArgument(f"retries must be 0-10, got {retries}", field="retries")
    values: list[Any] = [None] * len(inputs)
    arrived: list[Any] = []
    deadline = None if timeout is None else time.monotonic() + timeout

    async def collect() -> None:
        gen = answers(client, func, inputs, opts, warm=n, retries=retries, logs=logs)
        async with contextlib.aclosing(gen) as stream:
            async for index, value in stream:
                values[index] = value
                arrived.append(value)

    left = None if deadline is None else max(0.0, deadline - time.monotonic())
    await asyncio.wait_for(collect(), left)
    out = values if ordered else arrived
    if not return_exceptions:
        for value in values:
            if isinstance(value, CumulusError):
                raise value
    return out
