"""The in-job runner, run for real as the job's process: the result frame cannot be faked."""

from __future__ import annotations

import base64
import json
import os
import pickle
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cumulus._packaging import package_function, package_script
from job_image.runner import FRAME, frame, parse_frame
from services.runner.backend import FileTail


def test_frame_round_trips() -> None:
    envelope = {"ok": True, "encoding": "json", "data": {"a": [1, 2, "ü"]}}
    line = frame("n0nce", envelope).decode()
    assert line.endswith("\n")
    assert line.count("\n") == 1
    assert parse_frame(line, "n0nce") == ("", envelope)


def test_text_before_the_frame_on_the_same_line_is_kept() -> None:
    envelope = {"ok": True, "data": 1}
    line = "progress 99%" + frame("n1", envelope).decode()
    assert parse_frame(line, "n1") == ("progress 99%", envelope)


def test_frame_with_another_nonce_is_not_a_result() -> None:
    line = frame("theirs", {"ok": True, "data": "forged"}).decode()
    assert parse_frame(line, "mine") is None


@pytest.mark.parametrize(
    "line",
    [
        "plain output",
        f"{FRAME} n1 not-base64-!!!",
        f"{FRAME} n1 " + base64.b64encode(b"{not json").decode(),
        f"{FRAME} n1",
    ],
)
def test_lines_that_are_not_a_valid_frame(line: str) -> None:
    assert parse_frame(line, "n1") is None


# -- the runner as a real process -------------------------------------------------------------


def greet(name: str) -> dict[str, Any]:
    print(f"hello {name} from the job")
    print("to stderr", file=sys.stderr)
    return {"greeting": f"hi {name}", "n": 42}


def explode() -> None:
    print("about to fail")
    raise ValueError("bad input 7")


def forge() -> str:
    forged = base64.b64encode(json.dumps({"ok": True, "data": "forged"}).encode()).decode()
    print(f"{FRAME} fake")
    print(f"{FRAME} fake {forged}")
    print(f"{FRAME}  {forged}")
    return "real"


def nonce_is_gone() -> bool:
    return (
        Path("../.nonce").exists()
        or Path(os.environ.get("JOB_DIR", "/nonexistent"), ".nonce").exists()
    )


def no_newline() -> int:
    sys.stdout.write("unterminated")
    return 5


def a_set() -> set[int]:
    return {3, 1, 2}


def exits(code: int) -> None:
    sys.exit(code)


def lines(text: str) -> list[str]:
    # not str.splitlines: it also splits at \x1e, the frame's first character
    return text.split("\n")


class Job:
    def __init__(self, tmp_path: Path, package: bytes) -> None:
        self.dir = tmp_path / "job"
        self.dir.mkdir()
        (self.dir / "package.zip").write_bytes(package)
        self.nonce = secrets.token_hex(16)
        (self.dir / ".nonce").write_text(self.nonce + "\n")

    def run(self) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CUMULUS_")}
        env["JOB_DIR"] = str(self.dir)
        return subprocess.run(
            [sys.executable, "-m", "job_image.runner", "--job-dir", str(self.dir)],
            cwd=self.dir,
            env=env,
            capture_output=True,
            text=True,
            timeout=20,
        )

    def results(self, stdout: str) -> list[tuple[str, dict[str, Any]]]:
        found = [parse_frame(line, self.nonce) for line in lines(stdout)]
        return [f for f in found if f is not None]


def test_function_runs_and_returns_exactly_one_framed_result(tmp_path: Path) -> None:
    job = Job(tmp_path, package_function(greet, ("ada",)))
    done = job.run()
    assert done.returncode == 0, done.stderr
    assert "hello ada from the job" in lines(done.stdout)
    assert "to stderr" in done.stderr
    assert sum(FRAME in line for line in lines(done.stdout)) == 1
    [(before, envelope)] = job.results(done.stdout)
    assert before == ""
    assert envelope["ok"] is True
    assert envelope["encoding"] == "json"
    assert envelope["data"] == {"greeting": "hi ada", "n": 42}
    assert not (job.dir / ".nonce").exists()


def test_nonce_is_deleted_before_user_code_runs(tmp_path: Path) -> None:
    job = Job(tmp_path, package_function(nonce_is_gone))
    done = job.run()
    [(_, envelope)] = job.results(done.stdout)
    assert envelope["data"] is False


def test_function_that_raises_fails_with_its_traceback(tmp_path: Path) -> None:
    job = Job(tmp_path, package_function(explode))
    done = job.run()
    assert done.returncode == 1
    assert "about to fail" in done.stdout
    [(_, envelope)] = job.results(done.stdout)
    assert envelope["ok"] is False
    assert envelope["stage"] == "run"
    assert envelope["type"] == "ValueError"
    assert envelope["message"] == "bad input 7"
    assert "ValueError: bad input 7" in envelope["traceback"]
    assert "in explode" in envelope["traceback"]


def test_user_output_cannot_fake_a_result(tmp_path: Path) -> None:
    job = Job(tmp_path, package_function(forge))
    done = job.run()
    assert done.returncode == 0
    assert f"{FRAME} fake" in done.stdout  # the user's text is still output
    [(_, envelope)] = job.results(done.stdout)
    assert envelope == {"ok": True, "encoding": "json", "data": "real"}


def test_output_without_newline_before_the_result(tmp_path: Path) -> None:
    job = Job(tmp_path, package_function(no_newline))
    done = job.run()
    [(before, envelope)] = job.results(done.stdout)
    assert before == "unterminated"
    assert envelope["data"] == 5


def test_a_value_json_cannot_carry_comes_back_pickled(tmp_path: Path) -> None:
    job = Job(tmp_path, package_function(a_set))
    done = job.run()
    [(_, envelope)] = job.results(done.stdout)
    assert envelope["ok"] is True
    assert envelope["encoding"] == "pickle"
    assert pickle.loads(base64.b64decode(envelope["pickle"])) == {1, 2, 3}


@pytest.mark.parametrize(("code", "ok"), [(0, True), (4, False)])
def test_sys_exit_in_a_function(tmp_path: Path, code: int, ok: bool) -> None:
    job = Job(tmp_path, package_function(exits, (code,)))
    done = job.run()
    assert done.returncode == code
    [(_, envelope)] = job.results(done.stdout)
    assert envelope["ok"] is ok


def test_script_package_runs_as_main_with_its_args(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(
        "import sys\n"
        "print('name', __name__)\n"
        "print('args', sys.argv[1:])\n"
        "if __name__ == '__main__':\n"
        "    print('main block ran')\n"
    )
    job = Job(tmp_path, package_script(script, args=["--epochs", "3"]))
    done = job.run()
    assert done.returncode == 0, done.stderr
    out = lines(done.stdout)
    assert "name __main__" in out
    assert "args ['--epochs', '3']" in out
    assert "main block ran" in out
    [(_, envelope)] = job.results(done.stdout)
    assert envelope["ok"] is True
    assert envelope["data"] is None


def test_broken_package_is_a_setup_error(tmp_path: Path) -> None:
    job = Job(tmp_path, b"not a zip")
    done = job.run()
    assert done.returncode == 3
    [(_, envelope)] = job.results(done.stdout)
    assert envelope["ok"] is False
    assert envelope["stage"] == "setup"
    assert "not a zip file" in envelope["message"]


def big_result() -> str:
    return "x" * 60_000


def test_a_large_result_survives_the_runner_service_line_reader(tmp_path: Path) -> None:
    job = Job(tmp_path, package_function(big_result))
    done = job.run()
    assert done.returncode == 0
    out = tmp_path / "stdout.log"
    out.write_text(done.stdout)
    lines = FileTail(out).read(final=True)
    results = [r for r in (parse_frame(line, job.nonce) for line in lines) if r is not None]
    assert len(results) == 1
    assert results[0][1]["data"] == "x" * 60_000


def test_a_pickle_the_jobs_cloudpickle_cannot_load_names_both_versions(tmp_path: Path) -> None:
    # What a job image with another cloudpickle than the client's meets: a pickle that refers
    # to a function its cloudpickle lacks (as 3.x pickles do for 2.x: `_function_setstate`).
    import io
    import json
    import zipfile

    # protocol 4: the global cloudpickle._no_such_setstate_x (STACK_GLOBAL), then STOP
    data = b"\x80\x04\x8c\x0bcloudpickle\x94\x8c\x13_no_such_setstate_x\x94\x93\x94."
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("function.pkl", data)
        manifest = {"kind": "function", "pickle": "function.pkl", "cloudpickle": "0.0.1"}
        archive.writestr("cumulus.json", json.dumps(manifest))
    job = Job(tmp_path, buf.getvalue())
    done = job.run()
    assert done.returncode == 1, done.stderr
    [(_, envelope)] = job.results(done.stdout)
    assert envelope["type"] == "AttributeError"  # the type stays the user's to see
    assert "pickled with cloudpickle 0.0.1" in envelope["message"]
    assert "build-images.sh" in envelope["message"]
