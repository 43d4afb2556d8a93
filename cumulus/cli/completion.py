"""`cumulus completion bash|zsh|fish`: a shell completion script, made from the parser.

The script knows every command, sub-command, option and option choice that `cumulus --help`
shows (it is written from the same argparse parser, so it never falls behind), and falls back
to file names elsewhere (a script to run, a folder to download into). No dependency: bash
gets a function over a `case` table, zsh the same through `bashcompinit`, fish `complete`
lines.

    source <(cumulus completion bash)              # in ~/.bashrc
    source <(cumulus completion zsh)               # in ~/.zshrc
    cumulus completion fish > ~/.config/fish/completions/cumulus.fish
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass, field

from cumulus.cli.exits import EXIT_OK

SHELLS = ("bash", "zsh", "fish")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "completion",
        help="print a shell completion script: bash, zsh or fish",
        description="Print a completion script for your shell. bash: `source <(cumulus "
        "completion bash)` in ~/.bashrc; zsh: the same with zsh in ~/.zshrc; fish: "
        "`cumulus completion fish > ~/.config/fish/completions/cumulus.fish`.",
    )
    p.add_argument("shell", choices=SHELLS, help="the shell to complete in")


@dataclass
class Option:
    flags: list[str]
    help: str
    takes_value: bool
    choices: list[str]


@dataclass
class Command:
    """One parser: its path of command words, sub-commands, options."""

    path: tuple[str, ...]
    help: str = ""
    subcommands: dict[str, str] = field(default_factory=dict)
    """Name -> help."""
    options: list[Option] = field(default_factory=list)
    values: list[str] = field(default_factory=list)
    """The choices of its positional arguments (`completion bash|zsh|fish`)."""


def commands(parser: argparse.ArgumentParser) -> list[Command]:
    """Every parser under `parser` (itself first), as the completion scripts see them."""
    found: list[Command] = []

    def walk(p: argparse.ArgumentParser, path: tuple[str, ...], text: str) -> None:
        command = Command(path, text)
        found.append(command)
        nested: list[tuple[str, argparse.ArgumentParser, str]] = []
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                helps = {a.dest: a.help or "" for a in action._choices_actions}
                for name, child in action.choices.items():
                    command.subcommands[name] = helps.get(name, "")
                    nested.append((name, child, helps.get(name, "")))
            elif not action.option_strings:
                command.values += [str(c) for c in action.choices or []]
            else:
                choices = [str(c) for c in action.choices or []]
                command.options.append(
                    Option(
                        list(action.option_strings),
                        "" if action.help == argparse.SUPPRESS else str(action.help or ""),
                        action.nargs != 0,
                        choices,
                    )
                )
        for name, child, help_text in nested:
            walk(child, (*path, name), help_text)

    walk(parser, (), "")
    return found


def bash(parser: argparse.ArgumentParser) -> str:
    table = commands(parser)
    subs, words, choices = [], [], []
    for command in table:
        key = shlex.quote(" ".join(command.path))
        if command.subcommands:
            subs.append(f"        {key}) echo {shlex.quote(' '.join(command.subcommands))} ;;")
        flags = [f for option in command.options for f in option.flags]
        words.append(
            f"        {key}) echo "
            f"{shlex.quote(' '.join([*command.subcommands, *command.values, *flags]))} ;;"
        )
        for option in command.options:
            values = shlex.quote(" ".join(option.choices))
            for flag in option.flags if option.choices else []:
                pattern = shlex.quote(" ".join([*command.path, flag]))
                choices.append(f"        {pattern}) echo {values} ;;")
    nl = "\n"
    return f"""# cumulus completion for bash (`cumulus completion bash`)
_cumulus_subs() {{
    case "$1" in
{nl.join(subs)}
    esac
}}
_cumulus_words() {{
    case "$1" in
{nl.join(words)}
    esac
}}
_cumulus_choices() {{
    case "$1" in
{nl.join(choices)}
    esac
}}
_cumulus() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" prev="" path="" i w
    [[ $COMP_CWORD -gt 0 ]] && prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    for ((i = 1; i < COMP_CWORD; i++)); do
        w="${{COMP_WORDS[i]}}"
        case " $(_cumulus_subs "$path") " in
            *" $w "*) path="${{path:+$path }}$w" ;;
        esac
    done
    local found
    found="$(_cumulus_choices "${{path:+$path }}$prev")"
    if [[ -z "$found" ]]; then
        found="$(_cumulus_choices "$prev")"
    fi
    if [[ -n "$found" ]]; then
        COMPREPLY=($(compgen -W "$found" -- "$cur"))
        return
    fi
    COMPREPLY=($(compgen -W "$(_cumulus_words "$path")" -- "$cur"))
}}
complete -o bashdefault -o default -F _cumulus cumulus
"""


def zsh(parser: argparse.ArgumentParser) -> str:
    return (
        "#compdef cumulus\n# cumulus completion for zsh (`cumulus completion zsh`), through "
        "bash's\nautoload -U +X compinit && compinit\nautoload -U +X bashcompinit && "
        "bashcompinit\n" + bash(parser)
    )


def _fish_text(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _fish_condition(path: tuple[str, ...]) -> str:
    """When fish offers what a command at `path` takes."""
    if not path:
        return "__fish_use_subcommand"
    condition = f"__fish_seen_subcommand_from {path[-1]}"
    if len(path) > 1:
        condition = f"__fish_seen_subcommand_from {path[0]}; and {condition}"
    return condition


def _fish_option(condition: str | None, option: Option) -> str:
    parts = ["complete -c cumulus"]
    if condition:
        parts.append(f"-n {_fish_text(condition)}")
    for flag in option.flags:
        if flag.startswith("--"):
            parts.append(f"-l {flag[2:]}")
        elif len(flag) == 2:
            parts.append(f"-s {flag[1]}")
    if option.choices:
        parts.append(f"-x -a {_fish_text(' '.join(option.choices))}")
    elif option.takes_value:
        parts.append("-r")
    if option.help:
        parts.append(f"-d {_fish_text(option.help)}")
    return " ".join(parts)


def fish(parser: argparse.ArgumentParser) -> str:
    lines = ["# cumulus completion for fish (`cumulus completion fish`)"]
    for command in commands(parser):
        condition = _fish_condition(command.path)
        if command.subcommands and command.path:
            names = " ".join(command.subcommands)
            when = f"{condition}; and not __fish_seen_subcommand_from {names}"
        else:
            when = condition
        for name, help_text in command.subcommands.items():
            lines.append(
                f"complete -c cumulus -f -n {_fish_text(when)} -a {name} -d {_fish_text(help_text)}"
            )
        if command.values:
            values = _fish_text(" ".join(command.values))
            lines.append(f"complete -c cumulus -f -n {_fish_text(condition)} -a {values}")
        for option in command.options:
            lines.append(_fish_option(condition if command.path else None, option))
    return "\n".join(lines) + "\n"


def completion(args: argparse.Namespace) -> int:
    from cumulus.cli.parser import build_parser

    parser = build_parser()
    script = {"bash": bash, "zsh": zsh, "fish": fish}[args.shell](parser)
    print(script, end="")
    return EXIT_OK
