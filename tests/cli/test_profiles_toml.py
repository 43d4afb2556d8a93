"""Configuration profiles in `~/.config/cumulus/config.toml` (`cumulus profile list|show|use`,
`--profile NAME`, the profile's default gpu and duration), the credentials-file profiles that
keep working beside them, and `cumulus completion bash|zsh|fish`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.stack import Stack

CUMULUS = str(Path(sys.executable).parent / "cumulus")


def cumulus(
    env: dict[str, str], *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CUMULUS, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=90
    )


@pytest.fixture
def home(tmp_path: Path) -> dict[str, str]:
    """A user's environment with its own config dir and profiles, and no profile chosen."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUMULUS_")}
    env.update(XDG_CONFIG_HOME=str(tmp_path / "config"), CUMULUS_HOME=str(tmp_path / "home"))
    return env


def write_config(env: dict[str, str], text: str) -> Path:
    path = Path(env["XDG_CONFIG_HOME"]) / "cumulus" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_list_show_and_use(home: dict[str, str]) -> None:
    path = write_config(
        home,
        '# mine\n[profiles.lab]\nurl = "nats://lab:4222"\nuser = "alice"\ngpu = 0.3\n\n'
        '[profiles.cloud]\nurl = "nats://cloud:4222"\n',
    )
    listed = cumulus(home, "profile", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [p["name"] for p in json.loads(listed.stdout)["profiles"]] == ["cloud", "lab"]
    used = cumulus(home, "profile", "use", "lab")
    assert used.returncode == 0, used.stderr
    assert path.read_text().startswith('default = "lab"\n# mine\n')  # the rest untouched
    assert "* lab" in cumulus(home, "profile", "list").stdout
    shown = json.loads(cumulus(home, "profile", "show", "--json").stdout)
    assert (shown["name"], shown["url"], shown["user"], shown["gpu"]) == (
        "lab",
        "nats://lab:4222",
        "alice",
        0.3,
    )
    cumulus(home, "profile", "use", "cloud")
    assert path.read_text().count("default =") == 1
    assert "* cloud" in cumulus(home, "--profile", "cloud", "profile", "list").stdout
    missing = cumulus(home, "profile", "use", "nope")
    assert missing.returncode == 2
    assert "No profile 'nope'" in missing.stderr


def test_a_bad_config_file_says_where(home: dict[str, str]) -> None:
    write_config(home, '[profiles.lab]\nurl = "nats://lab:4222"\ncolour = "red"\n')
    listed = cumulus(home, "profile", "list")
    assert listed.returncode == 2
    assert "unknown key 'colour'" in listed.stderr
    assert "[profiles.lab]" in listed.stderr


def test_a_toml_profile_reaches_the_stack_with_its_defaults(
    stack: Stack, home: dict[str, str], tmp_path: Path
) -> None:
    write_config(
        home,
        f'[profiles.lab]\nurl = "{stack.url}"\ncredentials = "{stack.profile()}"\n'
        "gpu = 0.3\nduration = 600\n",
    )
    (tmp_path / "hello.py").write_text("print('hello from lab')\n")
    assert cumulus(home, "profile", "use", "lab").returncode == 0
    ran = cumulus(home, "run", "--json", "hello.py", cwd=tmp_path)  # no --profile: the default
    assert ran.returncode == 0, ran.stderr
    job_id = json.loads(ran.stdout.splitlines()[-1])["job_id"]
    status = json.loads(cumulus(home, "--profile", "lab", "status", job_id, "--json").stdout)
    assert (status["gpu"], status["duration_s"]) == ("0.3", 600)
    flagged = cumulus(home, "run", "--json", "--gpu", "0.2", "hello.py", cwd=tmp_path)
    flagged_id = json.loads(flagged.stdout.splitlines()[-1])["job_id"]
    status = json.loads(cumulus(home, "status", flagged_id, "--json").stdout)
    assert status["gpu"] == "0.2"  # the command line over the profile
    # a credentials file is still a profile, by path
    old = cumulus(home, "--profile", stack.profile(), "status", job_id, "--json")
    assert old.returncode == 0, old.stderr


def bash_complete(script: str, *words: str) -> list[str]:
    """What bash offers after `words` (the last one being completed), with the script."""
    array = " ".join(f"'{w}'" for w in words)
    program = (
        f"{script}\nCOMP_WORDS=({array}); COMP_CWORD={len(words) - 1}; _cumulus; "
        'printf "%s\\n" "${COMPREPLY[@]}"'
    )
    done = subprocess.run(
        ["bash", "-c", program], capture_output=True, text=True, timeout=30, check=True
    )
    return done.stdout.split()


def test_completion_scripts_know_the_commands_options_and_choices(home: dict[str, str]) -> None:
    script = cumulus(home, "completion", "bash").stdout
    assert bash_complete(script, "cumulus", "pro") == ["profile"]
    assert "download" in bash_complete(script, "cumulus", "")
    assert bash_complete(script, "cumulus", "run", "--du") == ["--duration"]
    assert bash_complete(script, "cumulus", "up", "--backend", "") == [
        "auto",
        "process",
        "docker",
        "swarm",
    ]
    assert bash_complete(script, "cumulus", "profile", "u") == ["use"]
    assert bash_complete(script, "cumulus", "completion", "f") == ["fish"]
    zsh = cumulus(home, "completion", "zsh").stdout
    assert zsh.startswith("#compdef cumulus")
    assert "bashcompinit" in zsh
    assert "_cumulus()" in zsh
    fish = cumulus(home, "completion", "fish").stdout
    assert "complete -c cumulus -n '__fish_seen_subcommand_from run' -l gpu -r" in fish
    assert "-a download" in fish
    bad = cumulus(home, "completion", "tcsh")
    assert bad.returncode == 2
