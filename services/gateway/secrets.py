"""Users' secrets, encrypted at rest: what `--secret NAME` / `secrets=[...]` refer to.

The gateway keeps them in a SQLite file of their own, `<data_dir>/secrets.sqlite` (table
`secrets (user, name, ciphertext, updated)`), apart from its event log, each value encrypted
with Fernet (AES-128-CBC and HMAC-SHA256) under the key in `<data_dir>/secrets.key` (made 0600
on first use; keep it with the data, back it up with it, and never in the same place as a
copy of the SQLite file you hand to someone). A secret's name is the environment variable
the job gets (`[A-Z_][A-Z0-9_]*`, not one Cumulus owns); its value reaches only the jobs of
its owner that name it, through `cumulus.secrets.<worker>.get` (services/gateway/app.py).

No value is ever logged; errors name the secret, never its value.
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from shared.errors import Internal, InvalidArgument, NotFound, ResourceExhausted
from shared.policy import env_refusal

NAME = re.compile(r"[A-Z_][A-Z0-9_]*")
"""A secret's name: the job's environment variable (upper case, so it stands out)."""
MAX_NAME = 128
MAX_VALUE_BYTES = 32 * 1024
"""The largest value (UTF-8 bytes): a token, a key, a small credentials file."""
MAX_SECRETS = 100
"""Secrets one user may keep."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS secrets (
    user TEXT NOT NULL,
    name TEXT NOT NULL,
    ciphertext BLOB NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (user, name)
)
"""


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
    """One gateway's secrets file. Thread-safe; each call is one short transaction."""

    def __init__(self, db: Path, key_file: Path) -> None:
        self.db_path = db
        self.key_file = key_file
        self._fernet = Fernet(load_key(key_file))
        db.parent.mkdir(parents=True, exist_ok=True)
        if not db.exists():
            os.close(os.open(db, os.O_WRONLY | os.O_CREAT, 0o600))
        self._db = sqlite3.connect(db, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA secure_delete=ON")  # a deleted value's pages are zeroed
        self._db.execute(_SCHEMA)
        self._lock = threading.Lock()

    @classmethod
    def open(cls, data_dir: Path) -> SecretStore:
        return cls(data_dir / "secrets.sqlite", data_dir / "secrets.key")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def put(self, user: str, name: str, value: str) -> bool:
        """Store (or replace) `user`'s secret; True if it is new."""
        check_name(name)
        check_value(name, value)
        token = self._fernet.encrypt(value.encode())
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                exists = self._db.execute(
                    "SELECT 1 FROM secrets WHERE user = ? AND name = ?", (user, name)
                ).fetchone()
                if not exists:
                    (count,) = self._db.execute(
                        "SELECT COUNT(*) FROM secrets WHERE user = ?", (user,)
                    ).fetchone()
                    if count >= MAX_SECRETS:
                        raise ResourceExhausted(
                            f"You have {count} secrets, the most one user may keep; delete one "
                            "you no longer use (`cumulus secrets rm NAME`)"
                        )
                self._db.execute(
                    "INSERT OR REPLACE INTO secrets (user, name, ciphertext, updated) "
                    "VALUES (?, ?, ?, ?)",
                    (user, name, token, time.time()),
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        return not exists

    def names(self, user: str) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT name FROM secrets WHERE user = ? ORDER BY name", (user,)
            ).fetchall()
        return [name for (name,) in rows]

    def missing(self, user: str, names: Iterable[str]) -> list[str]:
        """Those of `names` that `user` has no secret of."""
        have = set(self.names(user))
        return [name for name in names if name not in have]

    def sizes(self, user: str, names: Iterable[str]) -> dict[str, int]:
        """Bytes of the value of each of `user`'s secrets among `names` (a missing one is not
        in the answer): what the job's environment will hold."""
        out: dict[str, int] = {}
        with self._lock:
            for name in dict.fromkeys(names):
                row = self._db.execute(
                    "SELECT ciphertext FROM secrets WHERE user = ? AND name = ?", (user, name)
                ).fetchone()
                if row is not None:
                    out[name] = len(self._decrypt(name, bytes(row[0])).encode())
        return out

    def delete(self, user: str, name: str) -> None:
        with self._lock:
            gone = self._db.execute(
                "DELETE FROM secrets WHERE user = ? AND name = ?", (user, name)
            ).rowcount
        if not gone:
            raise NotFound(f"You have no secret named {name}")

    def values(self, user: str, names: Iterable[str]) -> dict[str, str]:
        """`user`'s secrets of these names, decrypted; NotFound names one that is gone."""
        wanted = list(dict.fromkeys(names))
        out: dict[str, str] = {}
        with self._lock:
            for name in wanted:
                row = self._db.execute(
                    "SELECT ciphertext FROM secrets WHERE user = ? AND name = ?", (user, name)
                ).fetchone()
                if row is None:
                    raise NotFound(
                        f"Secret {name} no longer exists (deleted after the job was submitted)"
                    )
                out[name] = self._decrypt(name, bytes(row[0]))
        return out

    def _decrypt(self, name: str, token: bytes) -> str:
        try:
            return self._fernet.decrypt(token).decode()
        except InvalidToken:
            raise Internal(
                f"Secret {name} cannot be decrypted with {self.key_file}: the key file "
                "was replaced; set the secret again"
            ) from None
