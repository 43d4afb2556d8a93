"""Code packages in: the gateway is the only way a user reaches the object store, so users stay
apart and each keeps within its quota.

A user uploads a package in chunks (`cumulus.api.<user>.upload`); the gateway assembles it,
checks that it hashes to its code_ref, that it is a safe package (job_image/package.py) and that
the user's stored bytes stay within `policy.stored_bytes`, and only then stores it as
`<user>.<sha256>`. A package that fails a check is never stored.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import msgspec
import nats.js.errors
from nats.js import JetStreamContext

from job_image.package import PackageError
from job_image.package import check as check_package
from shared import subjects
from shared.bus import CODE_TTL_DAYS
from shared.config import LimitsConfig
from shared.errors import InvalidArgument, ResourceExhausted

CHUNK_BYTES = 256 * 1024
"""Largest piece of a package in one request (under NATS's 1 MiB payload
once base64-encoded in JSON)."""
UPLOAD_TTL_S = 300.0
"""An upload not finished within this long is dropped."""
MAX_UPLOADS = 64
"""Uploads assembled at once, all users together."""
MAX_USER_UPLOADS = 4
"""Uploads one user may have in progress: one user cannot take every slot."""
USED_TTL_S = 60.0
"""How long a user's stored bytes are trusted before the bucket is counted again."""


class UploadRequest(msgspec.Struct, kw_only=True):
    code_ref: str
    size: int
    offset: int = 0
    data: bytes = b""


class UploadReply(msgspec.Struct, kw_only=True):
    stored: bool
    received: int = 0
    kind: str = ""
    gateway: str = ""
    """The gateway replica holding this unfinished upload (config `instance`): the next chunks
    go to `cumulus.api.<user>.upload.<gateway>`, since the chunks are assembled in its memory.
    Empty: one gateway, any subject."""


@dataclass
class _Upload:
    size: int
    data: bytearray = field(default_factory=bytearray)
    touched: float = field(default_factory=time.monotonic)


class CodeStore:
    """The gateway's side of the code bucket: uploads, checks, quotas."""

    def __init__(
        self,
        js: JetStreamContext,
        limits: LimitsConfig,
        code_ttl_s: float = CODE_TTL_DAYS * 86400,
        instance: str = "",
    ) -> None:
        self.js = js
        self.instance = instance
        """This gateway replica's name (config `instance`), told to the uploader."""
        self.limits = limits
        self.code_ttl_s = code_ttl_s
        """How long a package is kept after its upload (retention.code_ttl_s)."""
        self._store: Any = None
        self._uploads: dict[tuple[str, str], _Upload] = {}
        self._used: dict[str, tuple[int, float]] = {}
        """Bytes each user keeps stored and when they were counted (packages expire)."""
        self.kinds: OrderedDict[str, str] = OrderedDict()
        """Object name -> package kind, for packages that passed the checks."""

    async def store(self) -> Any:
        if self._store is None:
            self._store = await self.js.object_store(subjects.CODE_BUCKET)
        return self._store

    async def upload(self, user: str, req: UploadRequest, quota: int) -> UploadReply:
        if not _is_sha256(req.code_ref):
            raise InvalidArgument(
                f"Invalid code_ref {req.code_ref!r}: the sha256 of the package, in hex",
                field="code_ref",
            )
        if req.size > self.limits.max_code_bytes or req.size <= 0:
            raise InvalidArgument(
                f"Code package is {req.size} bytes; the limit is {self.limits.max_code_bytes}",
                field="code_ref",
            )
        name = subjects.code_object(user, req.code_ref)
        if req.offset == 0:
            if await self._stored_size(name) == req.size:
                return UploadReply(stored=True, received=req.size)
            await self._check_quota(user, req, quota)
        upload = self._assemble(user, req)
        if len(upload.data) < upload.size:
            return UploadReply(stored=False, received=len(upload.data), gateway=self.instance)
        del self._uploads[(user, req.code_ref)]
        kind = await self._keep(user, name, bytes(upload.data), quota)
        return UploadReply(stored=True, received=upload.size, kind=kind)

    def _assemble(self, user: str, req: UploadRequest) -> _Upload:
        now = time.monotonic()
        for key, stale in list(self._uploads.items()):
            if now - stale.touched > UPLOAD_TTL_S:
                del self._uploads[key]
        key = (user, req.code_ref)
        upload = self._uploads.get(key)
        if req.offset == 0:
            self._uploads.pop(key, None)
            if sum(1 for u, _ in self._uploads if u == user) >= MAX_USER_UPLOADS:
                raise ResourceExhausted(
                    f"You have {MAX_USER_UPLOADS} uploads in progress; finish one first"
                )
            if len(self._uploads) >= MAX_UPLOADS:
                raise ResourceExhausted("Too many uploads in progress; try again shortly")
            upload = self._uploads[key] = _Upload(req.size)
        if upload is None or req.offset != len(upload.data) or req.size != upload.size:
            raise InvalidArgument(
                f"Upload of {req.code_ref} out of order: start again from offset 0",
                field="offset",
            )
        if len(req.data) > CHUNK_BYTES or req.offset + len(req.data) > upload.size:
            del self._uploads[key]
            raise InvalidArgument("Upload chunk too large for the declared size", field="data")
        upload.data += req.data
        upload.touched = now
        return upload

    async def _check_quota(self, user: str, req: UploadRequest, quota: int) -> None:
        """Refuse at the first chunk an upload that cannot fit: the declared size, with what
        the user stores and is uploading already, against `policy.stored_bytes`."""
        pending = sum(
            u.size for (who, ref), u in self._uploads.items() if who == user and ref != req.code_ref
        )
        total = await self.used(user) + pending + req.size
        if total > quota:
            raise _over_quota(req.size, total, quota, self.code_ttl_s)

    async def _keep(self, user: str, name: str, data: bytes, quota: int) -> str:
        """Check a whole package and store it; nothing is stored if a check fails."""
        if hashlib.sha256(data).hexdigest() != name.split(".", 1)[1]:
            raise InvalidArgument("Code package does not match its code_ref (sha256)")
        try:
            manifest = check_package(data, self.limits.max_unpacked_bytes)
        except PackageError as exc:
            raise InvalidArgument(f"Invalid code package: {exc}") from None
        used = await self.used(user)
        if used + len(data) > quota:
            raise _over_quota(len(data), used + len(data), quota, self.code_ttl_s)
        store = await self.store()
        await store.put(name, data)
        self._used[user] = (used + len(data), self._used[user][1])
        kind = str(manifest["kind"])
        self.remember(name, kind)
        return kind

    def remember(self, name: str, kind: str) -> None:
        self.kinds[name] = kind
        while len(self.kinds) > 10_000:
            self.kinds.popitem(last=False)

    async def used(self, user: str) -> int:
        """Bytes of code the user keeps stored, counted again after USED_TTL_S."""
        known = self._used.get(user)
        if known is None or time.monotonic() - known[1] > USED_TTL_S:
            store = await self.store()
            prefix = f"{user}."
            try:
                infos = await store.list()
            except nats.js.errors.NotFoundError:
                infos = []
            total = sum(i.size or 0 for i in infos if i.name.startswith(prefix) and not i.deleted)
            known = self._used[user] = (total, time.monotonic())
        return known[0]

    async def _stored_size(self, name: str) -> int:
        store = await self.store()
        try:
            info = await store.get_info(name)
        except (nats.js.errors.ObjectNotFoundError, nats.js.errors.NotFoundError):
            return -1
        return int(info.size or 0)

    async def kind(self, user: str, code_ref: str) -> str:
        """The kind of a stored package of this user (`function` or `script`); INVALID_ARGUMENT
        if the user has stored no such package."""
        name = subjects.code_object(user, code_ref)
        if (known := self.kinds.get(name)) is not None:
            return known
        store = await self.store()
        try:
            result = await store.get(name)
        except (nats.js.errors.ObjectNotFoundError, nats.js.errors.NotFoundError):
            raise InvalidArgument(
                f"Code package {code_ref} not found in the object store; upload it first",
                field="code_ref",
            ) from None
        try:
            manifest = check_package(result.data or b"", self.limits.max_unpacked_bytes)
        except PackageError as exc:
            raise InvalidArgument(f"Invalid code package: {exc}") from None
        self.remember(name, str(manifest["kind"]))
        return str(manifest["kind"])


def _over_quota(size: int, total: int, quota: int, ttl_s: float) -> ResourceExhausted:
    return ResourceExhausted(
        f"Storing this package ({size} bytes) would put your stored code at {total} bytes; "
        f"your limit is {quota} (policy.stored_bytes). Packages expire {ttl_s / 86400:g} days "
        "after their upload; or ask the operator for more"
    )


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)
