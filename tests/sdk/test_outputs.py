"""A job's `outputs/` folder is kept when it ends and downloadable: `cumulus download JOB
[PATH] [-o DIR]` and `job.download(path, to=...)`, through the real stack, on the process
backend and (docker-marked) the Docker engine backend; over `worker.max_output_bytes` it is
not kept and the job's log says so; links are never followed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cumulus import AsyncClient, NotFound
from services.stack import Stack
from tests.conftest import StackFactory

CUMULUS = str(Path(sys.executable).parent / "cumulus")
WEIGHTS = bytes(range(256)) * 4096  # 1 MiB: several parts

SCRIPT = """\
import os
os.makedirs("outputs/sub", exist_ok=True)
with open("outputs/metrics.json", "w") as f:
    f.write('{"loss": 0.1}')
with open("outputs/sub/weights.bin", "wb") as f:
    f.write(bytes(range(256)) * 4096)
os.symlink("/etc/passwd", "outputs/passwd")
print("wrote")
"""


def write_outputs(n: int) -> int:
    import os as o

    o.makedirs("outputs/sub", exist_ok=True)
    with open("outputs/metrics.json", "w") as f:
        f.write('{"loss": 0.1}')
    with open("outputs/sub/weights.bin", "wb") as f:
        f.write(bytes(range(256)) * 4096)
    return n


def write_nothing() -> str:
    return "nothing"


def outputs_link_to_root() -> str:
    import os as o

    o.symlink("/", "outputs")
    return "linked"


def write_bytes(n: int) -> int:
    import os as o

    o.makedirs("outputs", exist_ok=True)
    with open("outputs/big.bin", "wb") as f:
        f.write(b"x" * n)
    return n


def test_cumulus_download_unpacks_the_outputs(stack: Stack, tmp_path: Path) -> None:
    env = {**os.environ, "CUMULUS_PROFILE": stack.profile(), "PYTHONUNBUFFERED": "1"}
    (tmp_path / "train.py").write_text(SCRIPT)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [CUMULUS, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=90
        )

    ran = cli("run", "--json", "train.py")
    assert ran.returncode == 0, ran.stderr
    job_id = json.loads(ran.stdout.splitlines()[-1])["job_id"]
    got = cli("download", job_id, "-o", "out")
    assert got.returncode == 0, got.stderr
    out = tmp_path / "out"
    assert sorted(got.stdout.split()) == ["out/metrics.json", "out/sub/weights.bin"]
    assert json.loads((out / "metrics.json").read_text()) == {"loss": 0.1}
    assert (out / "sub" / "weights.bin").read_bytes() == WEIGHTS
    assert not (out / "passwd").exists()  # a link is never followed, never kept
    one = cli("download", job_id, "sub/weights.bin", "-o", "one")  # one file
    assert one.returncode == 0, one.stderr
    assert [p.name for p in (tmp_path / "one").rglob("*") if p.is_file()] == ["weights.bin"]
    missing = cli("download", job_id, "nope.txt", "-o", "none")
    assert missing.returncode == 3
    assert "nope.txt" in missing.stderr


async def test_job_download_of_a_function(client: AsyncClient, tmp_path: Path) -> None:
    job = await client.submit(write_outputs, 3, gpu=0.1, duration=600)
    assert await job.result() == 3
    files = await job.download("sub", to=tmp_path / "sub-only")
    assert files == [tmp_path / "sub-only" / "sub" / "weights.bin"]
    assert files[0].read_bytes() == WEIGHTS
    every = await job.download(to=tmp_path / "all")
    assert sorted(p.name for p in every) == ["metrics.json", "weights.bin"]


async def test_no_outputs_and_a_link_instead_of_outputs_keep_nothing(
    client: AsyncClient, tmp_path: Path
) -> None:
    for func in (write_nothing, outputs_link_to_root):
        job = await client.submit(func, gpu=0.1, duration=600)
        await job.result()
        with pytest.raises(NotFound, match="kept no outputs"):
            await job.download(to=tmp_path / "out")
    assert not (tmp_path / "out").exists()


async def test_outputs_over_the_limit_are_not_kept_and_the_log_says_so(
    make_stack: StackFactory, tmp_path: Path
) -> None:
    small = await make_stack(workers=["w-small"], env={"CUMULUS_WORKER_MAX_OUTPUT_BYTES": "1000"})
    async with AsyncClient(profile=small.profile()) as c:
        job = await c.submit(write_bytes, 2000, gpu=0.1, duration=600)
        assert await job.result() == 2000
        lines = [line.text async for line in job.logs()]
        assert any("worker.max_output_bytes" in line and "not kept" in line for line in lines)
        with pytest.raises(NotFound):
            await job.download(to=tmp_path)
        fits = await c.submit(write_bytes, 500, gpu=0.1, duration=600)
        await fits.result()
        [kept] = await fits.download(to=tmp_path)
        assert kept.read_bytes() == b"x" * 500


@pytest.mark.docker
@pytest.mark.slow
async def test_docker_engine_outputs_are_downloadable(
    make_stack: StackFactory, tmp_path: Path
) -> None:
    from tests.runner.conftest import need

    need("docker")
    engine = await make_stack(workers=["docker-out-1"], backend="docker")
    async with AsyncClient(profile=engine.profile()) as c:
        job = await c.submit(write_outputs, 5, gpu=0.1, duration=600)
        assert await job.result() == 5
        files = await job.download(to=tmp_path)
        assert sorted(p.name for p in files) == ["metrics.json", "weights.bin"]
        assert (tmp_path / "sub" / "weights.bin").read_bytes() == WEIGHTS


def test_packing_keeps_plain_files_only_and_stops_at_the_limit(tmp_path: Path) -> None:
    import io
    import tarfile

    from services.runner import outputs

    folder = tmp_path / "work" / "outputs"
    (folder / "sub").mkdir(parents=True)
    (folder / "model.pt").write_bytes(b"m" * 100)
    (folder / "sub" / "notes.txt").write_text("ok")
    (folder / "passwd").symlink_to("/etc/passwd")  # a link: never followed
    (folder / "linked-dir").symlink_to("/etc")
    os.link(folder / "model.pt", tmp_path / "other-name")  # a file with another name
    (folder / "shared.bin").write_bytes(b"s")
    os.link(folder / "shared.bin", tmp_path / "shared-elsewhere")
    os.mkfifo(folder / "pipe")
    spool = io.BytesIO()
    assert outputs.pack(tmp_path, 10_000, spool) == 1  # model.pt has two names now
    spool.seek(0)
    with tarfile.open(fileobj=spool, mode="r:gz") as tar:
        assert sorted(tar.getnames()) == ["sub", "sub/notes.txt"]
    os.unlink(tmp_path / "other-name")
    spool = io.BytesIO()
    assert outputs.pack(tmp_path, 10_000, spool) == 2
    with pytest.raises(outputs.NotKept, match="worker.max_output_bytes"):
        outputs.pack(tmp_path, 50, io.BytesIO())
