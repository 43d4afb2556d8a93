"""Users' secrets, encrypted at rest: what `--secret NAME` / `secrets=[...]` refer to.

The gateways keep them in the JetStream key-value bucket `cumulus-secrets` (key
`<user>.<NAME>`, replicated like every bucket: `nats.replicas`), so every gateway replica sees
the same secrets; each value is encrypted with Fernet (AES-128-CBC and HMAC-SHA256) under the
key in `<data_dir>/secrets.key` before it leaves the gateway: the bus, its disk and whoever
reads the bucket hold ciphertext only. The key is made (0600) on the first gateway's first use;
copy it to every other gateway's data dir before starting them (docs/deploy.md), keep it with
the gateways, back it up, and never in the same place as a copy of the bus's store. Only the
gateway identity may touch the bucket (shared/auth.py).

A secret's name is the environment variable
the job gets (`[A-Z_][A-Z0-9_]*`, not one Cumulus owns); its value reaches only the jobs of
its owner that name it, through `cumulus.secrets.<worker>.get` (services/gateway/app.py).

No value is ever logged; errors name the secret, never its value.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import sqlite3
import uuid
from collections.abc import Awaitable, Iterable
from pathlib import Path
from typing import TypeVar

import nats.errors
from cryptography.fernet import Fernet, InvalidToken
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    KeyValueConfig,
    StorageType,
)
from nats.js.errors import BucketNotFoundError, KeyNotFoundError
from nats.js.kv import KeyValue

from shared.errors import Internal, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from shared.policy import env_refusal

log = logging.getLogger(__name__)

T = TypeVar("T")
CALL_TIMEOUT_S = 10.0
BUCKET = "cumulus-secrets"
"""The JetStream key-value bucket of every user's secrets (ciphertext only)."""

NAME = re.compile(r"[A-Z_][A-Z0-9_]*")
"""A secret's name: the job's environment variable (upper case, so it stands out)."""
MAX_NAME = 128
MAX_VALUE_BYTES = 32 * 1024
"""The largest value (UTF-8 bytes): a token, a key, a small credentials file."""
MAX_SECRETS = 100
"""Secrets one user may keep."""


def check_name(name: object) -> str:
    """The name if a secret may have it, else InvalidArgument saying why."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or len(name) > MAX_NAME:
        raise InvalidArgument(
            f"Invalid secret name {name!r}: a secret is the job's environment variable of that "
            f"name: upper-case letters, digits and '_', not starting with a digit, at most "
            f"{MAX_NAME} characters (e.g. HF_TOKEN)",
            field="name",
        )
    why = env_refusal(name)
    if why:
        raise InvalidArgument(
            f"Secret name {name} is not allowed: {why}; choose another name", field="name"
        )
    return name


def check_value(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"Secret {name}'s value must be a string", field="value")
    if "\x00" in value:
        raise InvalidArgument(
            f"Secret {name}'s value contains a NUL character, which an environment variable "
            "cannot hold",
            field="value",
        )
    if len(value.encode()) > MAX_VALUE_BYTES:
        raise InvalidArgument(
            f"Secret {name}'s value is {len(value.encode())} bytes; the most is "
            f"{MAX_VALUE_BYTES} (keep large files in the job's code package or fetch them)",
            field="value",
        )
    return value


def load_key(path: Path) -> bytes:
    """The Fernet key in `path`, made (0600, atomically) if there is none yet."""
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, Fernet.generate_key() + b"\n")
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # never replaces a key another process made meanwhile
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_bytes().strip()


class SecretStore:
    """The users' secrets in the bucket, encrypted under this gateway's key. Every method is one
    or a few bus round trips; a bus that does not answer is UNAVAILABLE."""

    def __init__(self, js: JetStreamContext, kv: KeyValue, key_file: Path) -> None:
        self.js = js
        self.kv = kv
        self.key_file = key_file
        self._fernet = Fernet(load_key(key_file))

    @classmethod
    async def open(cls, js: JetStreamContext, data_dir: Path, replicas: int = 1) -> SecretStore:
        """The bucket (made if missing, with `replicas` copies) and the key in
        `<data_dir>/secrets.key`; secrets a gateway kept in its own `secrets.sqlite` before
        (one gateway, older versions) are moved into the bucket once."""
        try:
            kv = await js.key_value(BUCKET)
        except BucketNotFoundError:
            config = KeyValueConfig(
                bucket=BUCKET,
                history=1,
                storage=StorageType.FILE,
                replicas=replicas,
                description="Users' secrets, Fernet ciphertext (services/gateway/secrets.py)",
            )
            kv = await js.create_key_value(config=config)
        store = cls(js, kv, data_dir / "secrets.key")
        await store._migrate(data_dir / "secrets.sqlite")
        return store

    async def _migrate(self, old: Path) -> None:
        rows = await asyncio.to_thread(_old_rows, old)
        if rows is None:
            return
        for user, name, token in rows:
            with contextlib.suppress(Exception):  # already there: the bucket's copy stays
                await self.kv.create(_key(user, name), token)
        await asyncio.to_thread(old.rename, old.with_name(old.name + ".migrated"))
        log.info("secrets moved into the bucket", extra={"fields": {"secrets": len(rows)}})

    def close(self) -> None:
        """Nothing to release (the bucket lives on the bus)."""

    async def put(self, user: str, name: str, value: str) -> bool:
        """Store (or replace) `user`'s secret; True if it is new."""
        check_name(name)
        check_value(name, value)
        token = self._fernet.encrypt(value.encode())
        exists = await self._token(user, name) is not None
        if not exists:
            count = len(await self.names(user))
            if count >= MAX_SECRETS:
                raise ResourceExhausted(
                    f"You have {count} secrets, the most one user may keep; delete one "
                    "you no longer use (`cumulus secrets rm NAME`)"
                )
        await _call(self.kv.put(_key(user, name), token))
        return not exists

    async def names(self, user: str) -> list[str]:
        return await _call(self._names(user))

    async def _names(self, user: str) -> list[str]:
        # The last entry of each of `<user>.*`'s keys, through a pull consumer: it delivers
        # nothing before it is asked, so its pending count at birth is exactly what there is
        # to read. (The library's watch() and keys() decide "that was all" from a count read
        # after delivery began, and could answer [] for a user who had secrets.)
        stream, consumer = f"KV_{BUCKET}", f"secrets-{uuid.uuid4().hex}"
        config = ConsumerConfig(
            name=consumer,
            filter_subject=f"$KV.{BUCKET}.{user}.*",
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            ack_policy=AckPolicy.NONE,
            headers_only=True,
            mem_storage=True,
            num_replicas=1,
            inactive_threshold=CALL_TIMEOUT_S * 3,  # if the delete below is lost
        )
        left = (await self.js.add_consumer(stream, config=config)).num_pending or 0
        names: list[str] = []
        try:
            sub = await self.js.pull_subscribe_bind(consumer=consumer, stream=stream)
            try:
                while left > 0:
                    for msg in await sub.fetch(min(left, 256), timeout=CALL_TIMEOUT_S):
                        left -= 1
                        if (msg.headers or {}).get("KV-Operation") not in ("DEL", "PURGE"):
                            names.append(msg.subject.rsplit(".", 1)[1])
            finally:
                await sub.unsubscribe()
        finally:
            with contextlib.suppress(Exception):
                await self.js.delete_consumer(stream, consumer)
        return sorted(names)

    async def missing(self, user: str, names: Iterable[str]) -> list[str]:
        """Those of `names` that `user` has no secret of."""
        have = set(await self.names(user))
        return [name for name in names if name not in have]

    async def sizes(self, user: str, names: Iterable[str]) -> dict[str, int]:
        """Bytes of the value of each of `user`'s secrets among `names` (a missing one is not
        in the answer): what the job's environment will hold."""
        out: dict[str, int] = {}
        for name in dict.fromkeys(names):
            token = await self._token(user, name)
            if token is not None:
                out[name] = len(self._decrypt(name, token).encode())
        return out

    async def delete(self, user: str, name: str) -> None:
        if await self._token(user, name) is None:
            raise NotFound(f"You have no secret named {name}")
        await _call(self.kv.purge(_key(user, name)))

    async def values(self, user: str, names: Iterable[str]) -> dict[str, str]:
        """`user`'s secrets of these names, decrypted; NotFound names one that is gone."""
        out: dict[str, str] = {}
        for name in dict.fromkeys(names):
            token = await self._token(user, name)
            if token is None:
                raise NotFound(
                    f"Secret {name} no longer exists (deleted after the job was submitted)"
                )
            out[name] = self._decrypt(name, token)
        return out

    async def _token(self, user: str, name: str) -> bytes | None:
        if not NAME.fullmatch(name):
            return None
        try:
            entry = await _call(self.kv.get(_key(user, name)))
        except KeyNotFoundError:  # also a deleted or purged key
            return None
        return entry.value or None

    def _decrypt(self, name: str, token: bytes) -> str:
        try:
            return self._fernet.decrypt(token).decode()
        except InvalidToken:
            raise Internal(
                f"Secret {name} cannot be decrypted with {self.key_file}: every gateway must "
                "have the same secrets.key (copy the first gateway's; docs/deploy.md), or the "
                "key was replaced; then set the secret again"
            ) from None


def _old_rows(old: Path) -> list[tuple[str, str, bytes]] | None:
    """The rows of a gateway's own secrets file from before the bucket; None if it has none."""
    if not old.exists():
        return None
    db = sqlite3.connect(old)
    try:
        rows = db.execute("SELECT user, name, ciphertext FROM secrets").fetchall()
    except sqlite3.Error:
        rows = []
    finally:
        db.close()
    return [(str(u), str(n), bytes(t)) for u, n, t in rows]


def _key(user: str, name: str) -> str:
    return f"{user}.{name}"


async def _call(call: Awaitable[T]) -> T:
    """A bucket call, with the bus's silence as UNAVAILABLE."""
    try:
        return await asyncio.wait_for(call, CALL_TIMEOUT_S)
    except (TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError):
        raise Unavailable("The secrets store (the bus) did not answer; retry shortly") from None
