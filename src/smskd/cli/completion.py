"""Shell completion for ``smskd``, generated from its argparse parser.

argparse has no completion of its own; writing the script from the parser keeps it
in step with the commands and options without a dependency (argcomplete would also
need a hook in the installed entry point). zsh runs the bash script through
``bashcompinit``.
"""

from __future__ import annotations

import argparse


def completion_script(parser: argparse.ArgumentParser, shell: str) -> str:
    """The script that ``eval "$(smskd completion bash)"`` installs in a shell."""
    commands = subcommands(parser)
    top = [*commands, *_options(parser)]
    cases, values = [], []
    for name, sub in commands.items():
        positional = [
            c for a in sub._actions if not a.option_strings and a.choices for c in a.choices
        ]
        cases.append(
            f'    {name}) opts="{" ".join(_options(sub))}"; words="{" ".join(positional)}" ;;'
        )
        for action in sub._actions:
            if action.option_strings and action.choices:
                for option in action.option_strings:
                    values.append(f'    "{name} {option}") words="{" ".join(action.choices)}" ;;')
    body = "\n".join(
        [
            "_smskd() {",
            '  local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}"',
            '  local opts="" words=""',
            '  if [ "$COMP_CWORD" -eq 1 ]; then',
            f'    COMPREPLY=($(compgen -W "{" ".join(top)}" -- "$cur")); return',
            "  fi",
            '  case "${COMP_WORDS[1]}" in',
            *cases,
            "  esac",
            '  case "${COMP_WORDS[1]} $prev" in',
            *values,
            '    *) if [[ "$cur" == -* ]]; then words="$opts"; fi ;;',
            "  esac",
            '  if [ -n "$words" ]; then',
            '    COMPREPLY=($(compgen -W "$words" -- "$cur"))',
            "  else",
            '    COMPREPLY=($(compgen -f -- "$cur"))',  # paths: configs, run directories
            "  fi",
            "}",
            "complete -o filenames -F _smskd smskd",
        ]
    )
    if shell == "zsh":
        body = "autoload -U +X bashcompinit && bashcompinit\n" + body
    return body + "\n"


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Each command's name and its own parser."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> list[str]:
    return [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
