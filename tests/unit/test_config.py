"""Configuration precedence: defaults < YAML file < CUMULUS_* environment; bad input is named."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared import config
from shared.errors import InvalidArgument


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    cfg = config.load(environ={})
    assert cfg.nats.url == "nats://127.0.0.1:4222"
    assert cfg.limits.min_duration == 60
    assert cfg.limits.max_job_duration == 86400
    assert cfg.worker.devices == "2x16GiB"
    assert cfg.worker.backend == "process"
    assert cfg.scheduler.max_attempts == 3


def test_yaml_file_overrides_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "nats:\n  url: nats://bus:4222\nlimits:\n  min_duration: 120\n"
        "worker:\n  id: gpu-7\ndata_dir: /srv/cumulus\n",
    )
    cfg = config.load(path, environ={})
    assert cfg.nats.url == "nats://bus:4222"
    assert cfg.nats.connect_timeout == 5.0  # untouched keys of a section keep their default
    assert cfg.limits.min_duration == 120
    assert cfg.limits.max_job_duration == 86400
    assert cfg.worker_id == "gpu-7"
    assert cfg.data_path == Path("/srv/cumulus")


def test_config_file_named_by_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "worker:\n  backend: docker\n")
    cfg = config.load(environ={"CUMULUS_CONFIG": str(path)})
    assert cfg.worker.backend == "docker"


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert config.load(write(tmp_path, ""), environ={}) == config.load(environ={})


def test_environment_overrides_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "nats:\n  url: nats://file:4222\nworker:\n  devices: 1x8GiB\n"
        "limits:\n  min_duration: 120\n",
    )
    cfg = config.load(
        path,
        environ={
            "CUMULUS_NATS_URL": "nats://env:4222",
            "CUMULUS_WORKER_DEVICES": "4x80GiB",
            "CUMULUS_LIMITS_MIN_DURATION": "30",
        },
    )
    assert cfg.nats.url == "nats://env:4222"
    assert cfg.worker.devices == "4x80GiB"
    assert cfg.limits.min_duration == 30
    assert isinstance(cfg.limits.min_duration, int)


def test_environment_of_other_programs_is_ignored() -> None:
    cfg = config.load(environ={"HOME": "/root", "CUMULUS_JOB_DIR": "/job", "PATH": "/bin"})
    assert cfg == config.load(environ={})


def test_unknown_key_in_yaml_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "nats:\n  urll: nats://typo:4222\n")
    with pytest.raises(InvalidArgument, match="urll"):
        config.load(path, environ={})


def test_unknown_section_in_yaml_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "schedular:\n  queue_limit: 5\n")
    with pytest.raises(InvalidArgument, match="schedular"):
        config.load(path, environ={})


def test_bad_value_in_yaml_names_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, "limits:\n  min_duration: soon\n")
    with pytest.raises(InvalidArgument, match=r"limits\.min_duration") as info:
        config.load(path, environ={})
    assert info.value.code == "INVALID_ARGUMENT"


def test_bad_value_in_environment_names_the_key() -> None:
    with pytest.raises(InvalidArgument, match=r"limits\.min_duration"):
        config.load(environ={"CUMULUS_LIMITS_MIN_DURATION": "abc"})


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_non_mapping_yaml_is_invalid(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(InvalidArgument, match="must be a mapping"):
        config.load(path, environ={})


def test_broken_yaml_is_invalid(tmp_path: Path) -> None:
    path = write(tmp_path, "nats: [unclosed\n")
    with pytest.raises(InvalidArgument, match="cannot read config"):
        config.load(path, environ={})


def test_missing_file_is_invalid(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="cannot read config"):
        config.load(tmp_path / "nope.yaml", environ={})
