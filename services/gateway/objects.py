"""Code packages in: the gateway is the only way a user reaches the object store, so users stay
apart and each keeps within its quota.

A user uploads a package in chunks (`cumulus.api.<user>.upload`); the gateway spools them to a
file of its own (under `<data_dir>/gateway[-<instance>].uploads/`, hashing as they come), checks
that the package hashes to its code_ref, that it is a safe package (job_image/package.py) and
that the user's stored bytes stay within `policy.stored_bytes`, and only then streams the file
into the object store as `<user>.<sha256>`. A package that fails a check is never stored; its
spool file is removed then, when an upload is abandoned (UPLOAD_TTL_S), and at start. No
package is ever held whole in memory, so `limits.max_code_bytes` can be gigabytes.

Chunks of one upload are taken strictly in order (a chunk at another offset is refused: start
again). The uploader may send a few before their answers come back: NATS delivers one
connection's messages in order, and a chunk is written before the handler first awaits
anything, so they are written in the order sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import msgspec
import nats.js.errors
from nats.js import JetStreamContext
from nats.js import api as js_api

from job_image.package import PackageError
from job_image.package import check as check_package
from shared import subjects
from shared.bus import CODE_TTL_DAYS
from shared.config import LimitsConfig
from shared.errors import InvalidArgument, ResourceExhausted, Unavailable

CHUNK_BYTES = 256 * 1024
"""Largest piece of a package in one request (under NATS's 1 MiB payload
once base64-encoded in JSON)."""
UPLOAD_TTL_S = 300.0
"""An upload with no chunk for this long is dropped (its spool file removed)."""
MAX_UPLOADS = 64
"""Uploads spooled at once, all users together."""
MAX_USER_UPLOADS = 4
"""Uploads one user may have in progress: one user cannot take every slot."""
USED_TTL_S = 60.0
"""How long a user's stored bytes are trusted before the bucket is counted again."""
SPOOL_FREE_BYTES = 256 * 1024 * 1024
"""Disk left free beside the spool (or a twentieth of a smaller disk): an upload that would eat
into it is refused at once, UNAVAILABLE (the gateway's state, not the user's quota)."""
KIND_HEADER = "Cumulus-Package-Kind"
"""A stored package's kind (`function` or `script`), in its object's headers: a submit to any
gateway replica learns it from the object's info, without fetching the package. Only the
gateway writes to the code bucket (users have no JetStream API), so the header is its own."""
STORE_CHUNK_BYTES = 512 * 1024
"""Object store chunk: fewer acked publishes per package than nats-py's 128 KiB default,
well under the bus's 1 MiB payload."""


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
    go to `cumulus.api.<user>.upload.<gateway>`, since the chunks are spooled on its disk.
    Empty: one gateway, any subject."""


@dataclass
class _Upload:
    size: int
    path: Path
    file: BinaryIO
    digest: Any = field(default_factory=hashlib.sha256)
    received: int = 0
    touched: float = field(default_factory=time.monotonic)

    def discard(self) -> None:
        """Close and remove the spool file (an upload finished, refused or abandoned)."""
        self.file.close()
        self.path.unlink(missing_ok=True)


class CodeStore:
    """The gateway's side of the code bucket: uploads, checks, quotas."""

    def __init__(
        self,
        js: JetStreamContext,
        limits: LimitsConfig,
        code_ttl_s: float = CODE_TTL_DAYS * 86400,
        instance: str = "",
        spool: Path | None = None,
        large_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        """`spool` is this replica's own directory for uploads in progress (emptied now: an
        upload does not outlive its gateway); None: a temporary one."""
        self.js = js
        self.instance = instance
        """This gateway replica's name (config `instance`), told to the uploader."""
        self.limits = limits
        self.code_ttl_s = code_ttl_s
        """How long a package is kept after its upload (retention.code_ttl_s)."""
        if spool is None:
            spool = Path(tempfile.mkdtemp(prefix="cumulus-uploads-"))
        shutil.rmtree(spool, ignore_errors=True)
        spool.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.spool = spool
        self._store: Any = None
        self._uploads: dict[tuple[str, str], _Upload] = {}
        self._used: dict[str, tuple[int, float]] = {}
        """Bytes each user keeps stored and when they were counted (packages expire)."""
        self.kinds: OrderedDict[str, str] = OrderedDict()
        """Object name -> package kind, for packages that passed the checks."""
        self.large_bytes = large_bytes
        """A package this large is deleted once no job uses it (retention.large_code_bytes)."""
        self.large: dict[str, int] = {}
        """Object name -> size, for the large packages this gateway stored or looked up."""

    async def store(self) -> Any:
        if self._store is None:
            self._store = await self.js.object_store(subjects.CODE_BUCKET)
        return self._store

    def close(self) -> None:
        """Drop every upload in progress (the gateway stops)."""
        for upload in self._uploads.values():
            upload.discard()
        self._uploads.clear()

    async def upload(self, user: str, req: UploadRequest, quota: int) -> UploadReply:
        if not _is_sha256(req.code_ref):
            raise InvalidArgument(
                f"Invalid code_ref {req.code_ref!r}: the sha256 of the package, in hex",
                field="code_ref",
            )
        if req.size > self.limits.max_code_bytes or req.size <= 0:
            raise InvalidArgument(
                f"Code package is {req.size} bytes; the limit is {self.limits.max_code_bytes} "
                "(limits.max_code_bytes): leave large data out of the package and fetch it "
                "inside the job",
                field="code_ref",
            )
        name = subjects.code_object(user, req.code_ref)
        if req.offset == 0:
            if await self._stored_size(name) == req.size:
                self._sized(name, req.size)
                return UploadReply(stored=True, received=req.size)
            await self._check_quota(user, req, quota)
            if len(req.data) == req.size:  # the whole package in one chunk: no spool file
                self._uploads.pop((user, req.code_ref), None)
                kind = await self._keep(user, name, req.data, req.size, quota)
                return UploadReply(stored=True, received=req.size, kind=kind)
        # From here to the chunk's write nothing is awaited: chunks sent back to back are
        # written in the order they came (see the module's docstring).
        upload = self._assemble(user, req)
        if upload.received < upload.size:
            return UploadReply(stored=False, received=upload.received, gateway=self.instance)
        del self._uploads[(user, req.code_ref)]
        try:
            upload.file.close()
            if upload.digest.hexdigest() != req.code_ref:
                raise InvalidArgument("Code package does not match its code_ref (sha256)")
            kind = await self._keep(user, name, upload.path, upload.size, quota)
        finally:
            upload.discard()
        return UploadReply(stored=True, received=upload.size, kind=kind)

    def _sweep(self) -> None:
        now = time.monotonic()
        for key, stale in list(self._uploads.items()):
            if now - stale.touched > UPLOAD_TTL_S:
                del self._uploads[key]
                stale.discard()

    def _assemble(self, user: str, req: UploadRequest) -> _Upload:
        """Append one chunk to its upload's spool file (a first chunk starts the upload)."""
        self._sweep()
        key = (user, req.code_ref)
        upload = self._uploads.get(key)
        if req.offset == 0:
            if upload is not None:
                del self._uploads[key]
                upload.discard()
            if sum(1 for u, _ in self._uploads if u == user) >= MAX_USER_UPLOADS:
                raise ResourceExhausted(
                    f"You have {MAX_USER_UPLOADS} uploads in progress; finish one first"
                )
            if len(self._uploads) >= MAX_UPLOADS:
                raise ResourceExhausted("Too many uploads in progress; try again shortly")
            self._check_room(req.size)
            fd, path = tempfile.mkstemp(dir=self.spool, prefix=f"{user}.{req.code_ref[:16]}.")
            upload = self._uploads[key] = _Upload(req.size, Path(path), os.fdopen(fd, "wb"))
        if upload is None or req.offset != upload.received or req.size != upload.size:
            raise InvalidArgument(
                f"Upload of {req.code_ref} out of order: start again from offset 0",
                field="offset",
            )
        if len(req.data) > CHUNK_BYTES or req.offset + len(req.data) > upload.size:
            del self._uploads[key]
            upload.discard()
            raise InvalidArgument("Upload chunk too large for the declared size", field="data")
        try:
            upload.file.write(req.data)
        except OSError as exc:
            del self._uploads[key]
            upload.discard()
            raise Unavailable(
                f"The gateway could not keep the upload ({exc.strerror}); try again later"
            ) from None
        upload.digest.update(req.data)
        upload.received += len(req.data)
        upload.touched = time.monotonic()
        return upload

    def _check_room(self, size: int) -> None:
        """Refuse at once an upload the spool's disk cannot take (with the ones under way)."""
        pending = sum(u.size - u.received for u in self._uploads.values())
        disk = shutil.disk_usage(self.spool)
        if disk.free - pending - size < min(SPOOL_FREE_BYTES, disk.total // 20):
            raise Unavailable(
                f"The gateway has no disk room for a package of {size} bytes now; try again later"
            )

    async def _check_quota(self, user: str, req: UploadRequest, quota: int) -> None:
        """Refuse at the first chunk an upload that cannot fit: the declared size, with what
        the user stores and is uploading already, against `policy.stored_bytes`."""
        pending = sum(
            u.size for (who, ref), u in self._uploads.items() if who == user and ref != req.code_ref
        )
        total = await self.used(user) + pending + req.size
        if total > quota:
            raise _over_quota(req.size, total, quota, self.code_ttl_s)

    async def _keep(
        self, user: str, name: str, package: Path | bytes, size: int, quota: int
    ) -> str:
        """Check a whole package (its spool file, or the bytes of a one-chunk upload, checked
        in the loop: a small zip's directory) and stream it into the store; nothing is stored
        if a check fails. A spool file's hash was checked as it came."""
        limit = self.limits.max_unpacked_bytes
        try:
            if isinstance(package, bytes):
                if hashlib.sha256(package).hexdigest() != name.split(".", 1)[1]:
                    raise InvalidArgument("Code package does not match its code_ref (sha256)")
                manifest = check_package(package, limit)
            else:
                manifest = await asyncio.to_thread(check_package, package, limit)
        except PackageError as exc:
            raise InvalidArgument(f"Invalid code package: {exc}") from None
        used = await self.used(user)
        if used + size > quota:
            raise _over_quota(size, used + size, quota, self.code_ttl_s)
        kind = str(manifest["kind"])
        store = await self.store()
        meta = js_api.ObjectMeta(
            name=name,
            headers={KIND_HEADER: [kind]},
            options=js_api.ObjectMetaOptions(max_chunk_size=STORE_CHUNK_BYTES),
        )
        if isinstance(package, bytes):
            await store.put(name, package, meta=meta)
        else:
            source = await asyncio.to_thread(open, package, "rb")
            try:
                await store.put(name, source, meta=meta)
            finally:
                source.close()
        self._used[user] = (used + size, self._used[user][1])
        self.remember(name, kind)
        self._sized(name, size)
        return kind

    def _sized(self, name: str, size: int) -> None:
        if size >= self.large_bytes:
            self.large[name] = size

    async def release(self, name: str) -> bool:
        """Delete a large package no job uses any more; whether it was there. Its owner's next
        submit of it uploads it again (the SDK does that by itself)."""
        self.kinds.pop(name, None)
        size = self.large.pop(name, 0)
        store = await self.store()
        try:
            await store.delete(name)
        except (nats.js.errors.ObjectNotFoundError, nats.js.errors.NotFoundError):
            return False
        user = name.split(".", 1)[0]
        if (known := self._used.get(user)) is not None:
            self._used[user] = (max(0, known[0] - size), known[1])
        return True

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
        if the user has stored no such package. The kind is in the object's headers; a package
        stored without it is fetched into a spool file and checked again."""
        name = subjects.code_object(user, code_ref)
        known = self.kinds.get(name)
        if known is not None and name not in self.large:
            return known
        # A large package may have been released since (by any replica): asked every time.
        store = await self.store()
        try:
            info = await store.get_info(name)
        except (nats.js.errors.ObjectNotFoundError, nats.js.errors.NotFoundError):
            self.kinds.pop(name, None)
            self.large.pop(name, None)
            raise InvalidArgument(
                f"Code package {code_ref} not found in the object store; upload it first",
                field="code_ref",
            ) from None
        self._sized(name, int(info.size or 0))
        if known is not None:
            return known
        header = (info.headers or {}).get(KIND_HEADER)
        kind = header[0] if isinstance(header, list) and header else header
        if kind in ("function", "script"):
            self.remember(name, str(kind))
            return str(kind)
        self._sweep()
        fd, path = tempfile.mkstemp(dir=self.spool, prefix=f"{user}.{code_ref[:16]}.get.")
        try:
            with os.fdopen(fd, "wb") as into:
                try:
                    await store.get(name, writeinto=into)
                except (nats.js.errors.ObjectNotFoundError, nats.js.errors.NotFoundError):
                    raise InvalidArgument(
                        f"Code package {code_ref} not found in the object store; upload it first",
                        field="code_ref",
                    ) from None
            try:
                manifest = await asyncio.to_thread(
                    check_package, path, self.limits.max_unpacked_bytes
                )
            except PackageError as exc:
                raise InvalidArgument(f"Invalid code package: {exc}") from None
        finally:
            os.unlink(path)
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
