"""TLS, profiles and identities as an operator and users meet them: a TLS stack (nats-server
requiring a client certificate from everyone), `cumulus up`'s profiles, `cumulus users add`
against the running stack, `cumulus certs`, `cumulus secrets`, and the clients that must not get
in (no client certificate, another CA, no CA, a credentials file others can read)."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import nats.errors
import pytest
from cryptography import x509

from cumulus import AsyncClient
from services.stack import Stack
from shared import auth, certs
from shared.errors import CumulusError, InvalidArgument

CUMULUS = str(Path(sys.executable).parent / "cumulus")


def _cli(
    *args: str, env: dict[str, str], cwd: Path, stdin: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CUMULUS, *args],
        env=env,
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
async def tls_stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    s = Stack(data_dir=tmp_path_factory.mktemp("tls-stack"), devices="2x16GiB", tls=True)
    try:
        await s.start()
        yield s
    finally:
        s.stop()


def _variant(source: str, out: Path, **tls: str) -> str:
    """A copy of a credentials file whose TLS files are `tls` (0600)."""
    creds = auth.load_credentials(source)
    creds.tls = auth.TlsFiles(**tls) if tls else None
    auth.write_credentials(out, creds)
    return str(out)


async def test_tls_stack_runs_a_job_with_a_profile(tls_stack: Stack) -> None:
    config = json.loads((tls_stack.data_dir / "nats.conf").read_text())
    assert config["tls"]["verify"] is True  # mTLS: every client shows a certificate
    assert tls_stack.url.startswith("nats://")  # nats-py upgrades: the server requires TLS
    profile = auth.load_credentials(tls_stack.profile())
    assert profile.tls is not None
    assert profile.tls.cert.endswith("user-default.crt")
    for path in (tls_stack.tls_dir / "ca.key", tls_stack.tls_dir / "user-default.key"):
        assert path.stat().st_mode & 0o777 == 0o600
    worker = auth.load_credentials(tls_stack.credentials("worker", "worker-1", ("worker-1",)))
    assert worker.tls is not None
    assert worker.tls.cert
    async with AsyncClient(profile=tls_stack.profile()) as client:
        assert await client.run(lambda: 2 + 2, gpu=0.1, duration=600, timeout=120) == 4


async def test_no_client_certificate_is_refused(tls_stack: Stack, tmp_path: Path) -> None:
    ca = str(tls_stack.tls_dir / "ca.crt")
    bare = _variant(tls_stack.profile(), tmp_path / "bare.json", ca=ca)
    with pytest.raises(CumulusError) as caught:
        async with AsyncClient(profile=bare):
            pass
    assert caught.value.code in ("UNAVAILABLE", "UNAUTHENTICATED")
    seed = auth.load_credentials(tls_stack.profile()).seed
    # no client certificate and no CA of this stack: the handshake fails
    with pytest.raises((ssl.SSLError, nats.errors.Error)):
        await _plain_connect(tls_stack.url, seed)


async def _plain_connect(url: str, seed: str) -> None:
    nc = await nats.connect(url, nkeys_seed_str=seed, allow_reconnect=False, connect_timeout=2)
    await nc.close()


async def test_another_ca_or_none_cannot_connect(tls_stack: Stack, tmp_path: Path) -> None:
    """A valid identity (nkey seed) with a certificate from another CA, or with no CA to
    check the server by, does not get onto the bus."""
    other = certs.make_ca(tmp_path / "other-ca")
    forged = certs.issue(tmp_path / "other-ca", "user-default")
    wrong = _variant(
        tls_stack.profile(),
        tmp_path / "wrong.json",
        ca=str(other.cert),
        cert=str(forged.cert),
        key=str(forged.key),
    )
    theirs = _variant(  # the stack's CA to check the server, but a client cert it never signed
        tls_stack.profile(),
        tmp_path / "theirs.json",
        ca=str(tls_stack.tls_dir / "ca.crt"),
        cert=str(forged.cert),
        key=str(forged.key),
    )
    none = _variant(tls_stack.profile(), tmp_path / "none.json")
    for profile in (wrong, theirs, none):
        with pytest.raises(CumulusError):
            async with AsyncClient(profile=profile):
                pass


def test_certs_init_and_issue(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ca_dir = tmp_path / "ca"
    made = _cli("certs", "init", str(ca_dir), env=env, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert (ca_dir / "ca.key").stat().st_mode & 0o777 == 0o600
    again = _cli("certs", "init", str(ca_dir), env=env, cwd=tmp_path)
    assert again.returncode == 2
    assert "already holds a CA" in again.stderr
    issued = _cli(
        "certs", "issue", str(ca_dir), "nats", "--server", "--host", "10.0.0.5", "--host",
        "bus.example.org", env=env, cwd=tmp_path,
    )  # fmt: skip
    assert issued.returncode == 0, issued.stderr
    cert = x509.load_pem_x509_certificate((ca_dir / "nats.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "bus.example.org" in san.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert (ca_dir / "nats.key").stat().st_mode & 0o777 == 0o600
    with pytest.raises(InvalidArgument, match="--host"):
        certs.issue(ca_dir, "nats2", server=True)


def test_users_add_for_a_fleet_makes_every_role_in_an_auth_dir(tmp_path: Path) -> None:
    """A fleet has no `cumulus up`: the operator keeps its identities in a directory, a
    worker's bundle names its worker id and its TLS files beside it; the fleet's own roles are
    refused without --auth-dir (they would bypass the stack's admin check)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ca, authdir = tmp_path / "ca", tmp_path / "auth"
    assert _cli("certs", "init", str(ca), env=env, cwd=tmp_path).returncode == 0
    urls = "tls://10.0.0.11:4222,tls://10.0.0.12:4222"
    made = _cli(
        "users", "add", "gpu-7", "--role", "worker", "--auth-dir", str(authdir), "--url", urls,
        "--ca-dir", str(ca), "--out", str(tmp_path / "bundle" / "gpu-7.json"), env=env,
        cwd=tmp_path,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert "cumulus nats-config" in made.stderr  # what to do for the bus to accept it
    bundle = json.loads((tmp_path / "bundle" / "gpu-7.json").read_text())
    assert (bundle["role"], bundle["workers"], bundle["url"]) == ("worker", ["gpu-7"], urls)
    assert bundle["tls"] == {"ca": "gpu-7-ca.crt", "cert": "gpu-7.crt", "key": "gpu-7.key"}
    assert (tmp_path / "bundle" / "gpu-7.key").stat().st_mode & 0o777 == 0o600
    for role in ("gateway", "scheduler"):
        done = _cli(
            "users", "add", role, "--role", role, "--auth-dir", str(authdir), "--url", urls,
            "--ca-dir", str(ca), env=env, cwd=tmp_path,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
    listed = _cli("users", "list", "--auth-dir", str(authdir), "--json", env=env, cwd=tmp_path)
    rows = {(r["role"], r["name"]) for r in json.loads(listed.stdout)}
    assert rows == {("worker", "gpu-7"), ("gateway", "gateway"), ("scheduler", "scheduler")}
    users = auth.AuthDir(authdir).authorization()["users"]
    assert len(users) == 3
    assert all("nkey" in u for u in users)
    no_dir = _cli("users", "add", "gpu-8", "--role", "worker", env=env, cwd=tmp_path)
    assert no_dir.returncode == 2
    assert "--auth-dir" in no_dir.stderr
    no_url = _cli("users", "add", "x", "--auth-dir", str(authdir), env=env, cwd=tmp_path)
    assert no_url.returncode == 2
    assert "--url" in no_url.stderr


def test_listening_beyond_loopback_needs_tls(tmp_path: Path) -> None:
    env = {**os.environ, "CUMULUS_HOME": str(tmp_path / "home")}
    for extra in ((), ("--tls", "--insecure")):
        done = _cli(
            "up", "--listen", "0.0.0.0", "--port", "0", "--data-dir", str(tmp_path / "d"),
            *extra, env=env, cwd=tmp_path, timeout=30,
        )  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert "refusing to listen on 0.0.0.0" in done.stderr
    assert not (tmp_path / "d" / "nats.conf").exists()  # refused before anything started


@pytest.fixture
def up(tmp_path: Path) -> Iterator[tuple[dict[str, str], Path]]:
    """`cumulus up --tls` in its own $CUMULUS_HOME, as an operator starts it; stopped by pid."""
    home, data = tmp_path / "home", tmp_path / "data"
    env = {**os.environ, "CUMULUS_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    env.pop("CUMULUS_NATS_URL", None)
    env.pop("CUMULUS_PROFILE", None)
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [CUMULUS, "up", "--tls", "--port", "0", "--data-dir", str(data)],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 90
        while "press Ctrl-C" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield env, home
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    assert not (home / "stack.json").exists()  # `up` forgets the stack it stopped


def test_users_add_against_a_running_stack(up: tuple[dict[str, str], Path], tmp_path: Path) -> None:
    env, home = up
    for name in ("default", "admin"):
        assert (home / "profiles" / f"{name}.json").stat().st_mode & 0o777 == 0o600
    (tmp_path / "job.py").write_text("print('hello from', __name__)\n")
    # zero configuration: the `default` profile `cumulus up` wrote
    ran = _cli("run", "--gpu", "0.1", "--duration", "600", "job.py", env=env, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert "hello from __main__" in ran.stdout
    mine = _cli("submit", "--gpu", "0.1", "job.py", env=env, cwd=tmp_path)
    assert mine.returncode == 0, mine.stderr
    job_id = mine.stdout.strip()

    added = _cli("users", "add", "bob", "--out", str(tmp_path / "bob" / "bob.json"), env=env,
                 cwd=tmp_path)  # fmt: skip
    assert added.returncode == 0, added.stderr
    bob = tmp_path / "bob" / "bob.json"
    assert str(bob) in added.stdout
    assert bob.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "bob" / "bob.key").stat().st_mode & 0o777 == 0o600
    listed = _cli("users", "list", "--json", env=env, cwd=tmp_path)
    users = sorted(row["name"] for row in json.loads(listed.stdout) if row["role"] == "user")
    assert users == ["bob", "default"]
    as_bob = ("--profile", str(bob))
    ran = _cli(*as_bob, "run", "--gpu", "0.1", "--duration", "600", "job.py", env=env,
               cwd=tmp_path)  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert "hello from __main__" in ran.stdout
    peek = _cli(*as_bob, "status", job_id, env=env, cwd=tmp_path)
    assert peek.returncode == 3
    assert "NOT_FOUND" in peek.stderr
    stop = _cli(*as_bob, "cancel", job_id, env=env, cwd=tmp_path)
    assert stop.returncode == 3
    # only the operator adds users
    denied = _cli(*as_bob, "users", "add", "mallory", env=env, cwd=tmp_path)
    assert denied.returncode == 7
    assert "operator" in denied.stderr
    # a credentials file others can read is refused, with what to do
    os.chmod(bob, 0o644)
    loose = _cli(*as_bob, "jobs", env=env, cwd=tmp_path)
    assert loose.returncode == 2
    assert "readable by others" in loose.stderr
    assert "chmod 600" in loose.stderr


def test_secrets_commands(up: tuple[dict[str, str], Path], tmp_path: Path) -> None:
    env, _ = up
    stored = _cli("secrets", "set", "API_TOKEN", env=env, cwd=tmp_path, stdin="s3cret-value\n")
    assert stored.returncode == 0, stored.stderr
    listed = _cli("secrets", "list", env=env, cwd=tmp_path)
    assert listed.stdout.split() == ["API_TOKEN"]
    assert "s3cret-value" not in listed.stdout + listed.stderr
    (tmp_path / "job.py").write_text(
        textwrap.dedent(
            """
            import os
            print("token ok" if os.environ["API_TOKEN"] == "s3cret-value" else "wrong")
            """
        )
    )
    ran = _cli("run", "--gpu", "0.1", "--secret", "API_TOKEN", "job.py", env=env, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert "token ok" in ran.stdout
    gone = _cli("secrets", "rm", "API_TOKEN", env=env, cwd=tmp_path)
    assert gone.returncode == 0, gone.stderr
    assert _cli("secrets", "list", env=env, cwd=tmp_path).stdout.split() == []
