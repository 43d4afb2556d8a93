"""Configuration precedence: defaults < YAML file < CUMULUS_* environment; bad input is named."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest

from services.runner.app import Runner
from shared import config
from shared.errors import ConfigError, InvalidArgument


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


# -- validated at load ------------------------------------------------------------------------


def test_backfill_typo_in_file_is_refused_not_greedy(tmp_path: Path) -> None:
    # The scheduler treats any backfill but reserve/none as greedy: a typo used to turn off the
    # anti-starvation reservation without a word.
    path = write(tmp_path, "scheduler:\n  backfill: reserv\n")
    with pytest.raises(ConfigError) as info:
        config.load(path, environ={})
    assert str(info.value) == (
        f"Invalid scheduler.backfill: 'reserv' (in {path}). Must be one of reserve, none, greedy"
    )
    assert info.value.key == "scheduler.backfill"
    assert info.value.allowed == ("reserve", "none", "greedy")
    assert info.value.code == "INVALID_ARGUMENT"


def test_enum_typo_in_environment_names_key_and_variable() -> None:
    with pytest.raises(ConfigError) as info:
        config.load(environ={"CUMULUS_SCHEDULER_BACKFILL": "greedyy"})
    assert "scheduler.backfill" in info.value.message
    assert "CUMULUS_SCHEDULER_BACKFILL" in info.value.message
    assert "reserve, none, greedy" in info.value.message


@pytest.mark.parametrize(
    ("key", "bad"),
    [
        ("scheduler.placement", "best-fit"),
        ("worker.backend", "podman"),
        ("worker.device_source", "cuda"),
        ("logging.format", "xml"),
        ("logging.level", "verbose"),
    ],
)
def test_every_enumerated_setting_is_checked(key: str, bad: str) -> None:
    with pytest.raises(ConfigError, match="Must be one of") as info:
        config.load(environ={config.env_name(key): bad})
    assert info.value.key == key
    assert info.value.allowed == config.allowed(key)


def test_enumerations_are_what_the_code_supports() -> None:
    from cumulus_core import devices
    from services.runner.config import BACKENDS
    from services.scheduler import handlers, placement

    assert config.allowed("scheduler.placement") == placement.POLICIES
    assert config.allowed("scheduler.backfill") == handlers.BACKFILL
    assert config.allowed("worker.backend") == BACKENDS
    assert set(config.allowed("worker.device_source")) == set(devices.BACKENDS)
    assert typing.get_args(config.LogFormat) == ("json", "text")


def test_log_level_is_case_insensitive(tmp_path: Path) -> None:
    assert config.load(environ={"CUMULUS_LOGGING_LEVEL": "WARNING"}).logging.level == "warning"
    path = write(tmp_path, "logging:\n  level: Debug\n")
    assert config.load(path, environ={}).logging.level == "debug"


def test_unknown_key_in_environment_section_is_named() -> None:
    with pytest.raises(ConfigError) as info:
        config.load(environ={"CUMULUS_SCHEDULER_BACKFIL": "none"})
    assert info.value.message.startswith(
        "Unknown config key scheduler.backfil (from CUMULUS_SCHEDULER_BACKFIL)"
    )
    assert info.value.key == "scheduler.backfil"
    assert "backfill" in info.value.allowed


def test_unknown_key_in_file_lists_the_section(tmp_path: Path) -> None:
    path = write(tmp_path, "scheduler:\n  backfil: none\n")
    with pytest.raises(ConfigError, match=r"scheduler\.backfil .*scheduler section has") as info:
        config.load(path, environ={})
    assert info.value.key == "scheduler.backfil"


def test_variables_of_the_sdk_and_stack_are_not_settings() -> None:
    environ = {"CUMULUS_USER": "alice", "CUMULUS_WHEELHOUSE": "/w", "CUMULUS_CONFIG": ""}
    assert config.load(environ=environ) == config.load(environ={})


@pytest.mark.parametrize(
    ("key", "bad", "expected"),
    [
        ("metrics_port", "-1", ">= 0"),
        ("metrics_port", "70000", "<= 65535"),
        ("ssh.port", "0", ">= 1"),
        ("worker.heartbeat_s", "0", "> 0"),
        ("worker.create_retries", "0", ">= 1"),
        ("worker.reap_interval_s", "-1", ">= 0"),
        ("scheduler.queue_limit", "0", ">= 1"),
        ("scheduler.swarm_poll_s", "-0.5", "> 0"),
        ("nats.connect_timeout", "0", "> 0"),
        ("limits.min_duration", "0", ">= 1"),
    ],
)
def test_numbers_out_of_range_name_the_key(key: str, bad: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as info:
        config.load(environ={config.env_name(key): bad})
    assert info.value.key == key
    assert config.env_name(key) in info.value.message


def test_zero_where_zero_means_off_is_accepted() -> None:
    cfg = config.load(
        environ={"CUMULUS_WORKER_REAP_INTERVAL_S": "0", "CUMULUS_SCHEDULER_RESERVE_AFTER_S": "0"}
    )
    assert cfg.worker.reap_interval_s == 0
    assert cfg.scheduler.reserve_after_s == 0


def test_the_runners_package_cache_is_as_large_as_the_operator_says(tmp_path: Path) -> None:
    environ = {"CUMULUS_WORKER_PACKAGE_CACHE_BYTES": "1GiB", "CUMULUS_DATA_DIR": str(tmp_path)}
    runner = Runner(config.load(environ=environ))
    assert runner._packages.limit == 1024**3
    assert config.load(environ={}).worker.cache_bytes == 4 * 1024**3
    for bad, expected in (("0", "at least 1 byte"), ("lots", "lots")):
        with pytest.raises(ConfigError, match=expected) as info:
            config.load(environ={"CUMULUS_WORKER_PACKAGE_CACHE_BYTES": bad})
        assert info.value.key == "worker.package_cache_bytes"
        assert "CUMULUS_WORKER_PACKAGE_CACHE_BYTES" in info.value.message


def test_min_duration_above_max_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "limits:\n  min_duration: 600\n  max_job_duration: 120\n")
    with pytest.raises(ConfigError, match="above limits.max_job_duration") as info:
        config.load(path, environ={})
    assert info.value.key == "limits.min_duration"


def test_settings_are_what_the_user_set(tmp_path: Path) -> None:
    path = write(tmp_path, "worker:\n  devices: 1x8GiB\n")
    given = config.settings(path, environ={"CUMULUS_WORKER_BACKEND": "docker", "HOME": "/"})
    assert given == {"worker": {"devices": "1x8GiB", "backend": "docker"}}


def test_every_key_is_documented() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "config.md").read_text()
    assert "scheduler.backfill" in config.all_keys()
    for key in config.all_keys():
        assert f"`{key}`" in doc, key
        assert f"`{config.env_name(key)}`" in doc, key


def test_documented_defaults_are_the_defaults(tmp_path: Path) -> None:
    doc = (Path(__file__).parents[2] / "docs" / "config.md").read_text()
    block = doc.split("## A complete file with the defaults")[1].split("```yaml\n")[1]
    loaded = config.load(write(tmp_path, block.split("```")[0]), environ={})
    assert loaded.ssh.workers == {}
    loaded.ssh.workers = ""  # the empty map and the empty string both mean local mode
    assert loaded == config.load(environ={})
