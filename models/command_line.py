"""The commands' flag parsing: whole flag names only, a one-value flag given once, one error line.

argparse by default takes an abbreviation (`--out` for `--output`, `--over` for
`--overwrite`) and keeps the last of two values of a flag without a word; either
writes, or replaces, where the user did not say. Imports neither Keras nor Beam.
"""

from __future__ import annotations

import argparse
import difflib
import sys
import typing
from collections.abc import Collection, Sequence
from typing import Any

# argparse's actions that keep one value: given twice, the last silently wins.
ONE_VALUE_ACTIONS = (
    argparse._StoreAction,
    argparse._StoreConstAction,
    argparse._StoreTrueAction,
    argparse._StoreFalseAction,
)


class _RecordingNamespace(argparse.Namespace):
    """A namespace that remembers every value argparse stores in it, per flag."""

    def __init__(self, dests: Sequence[str]) -> None:
        super().__init__()
        object.__setattr__(self, "stored", {dest: [] for dest in dests})
        # Present before parsing, so argparse neither stores their defaults nor converts them.
        for dest in dests:
            object.__setattr__(self, dest, None)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.stored:
            self.stored[name].append(value)
        super().__setattr__(name, value)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _is_value(text: str, flags: Collection[str]) -> bool:
    """Whether `text`, starting with "-", after a one-value flag is its value, not a flag.

    A number is (`-inf`, `-1e3`), and so is text that names no flag of the command (a file
    `-draft.txt`, a token `-lrb-`, an id `-a7`). Text that does is a flag: `-k`, `-k5`,
    `--output`, and `-overwrite` for `--overwrite` (the value was forgotten).
    """
    if _is_number(text):
        return True
    name = text.split("=", 1)[0]
    return not text.startswith("--") and name[:2] not in flags and "-" + name not in flags


def join_negative_numbers(parser: argparse.ArgumentParser, args: Sequence[str]) -> list[str]:
    """`args` with each `--flag -VALUE` of a one-value flag, VALUE no flag (`_is_value`), written
    `--flag=-VALUE`.

    argparse takes only `-1` and `-0.5` after a flag as its value: `--shard_mb -inf`, `-1e3`,
    or `--input -draft.txt`, got its "expected one argument", though one was given, not the
    flag's check saying which values it takes.
    """
    flags = {flag for action in parser._actions for flag in action.option_strings}
    takes_one = {
        flag
        for action in parser._actions
        if isinstance(action, (argparse._StoreAction, argparse._AppendAction)) and action.nargs is None
        for flag in action.option_strings
    }
    joined: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "--":  # What follows is no flag of ours.
            joined.extend(args[index:])
            break
        value = args[index + 1] if index + 1 < len(args) else ""
        if arg in takes_one and value.startswith("-") and value != "-" and _is_value(value, flags):
            joined.append(f"{arg}={value}")
            index += 2
            continue
        joined.append(arg)
        index += 1
    return joined


def parse_recording_repeats(
    parser: argparse.ArgumentParser, args: Sequence[str]
) -> tuple[argparse.Namespace, list[str], list[str]]:
    """Parses `args` with `parser` into a namespace without defaults, for checking only.

    Returns:
        (that namespace, the arguments `parser` does not know, the one-value flags
        `args` give more than once with different values, as `--flag`).
    """
    actions = {a.dest: a for a in parser._actions if isinstance(a, ONE_VALUE_ACTIONS) and a.option_strings}
    namespace = _RecordingNamespace(list(actions))
    _, unknown = parser.parse_known_args(list(args), namespace=namespace)
    repeated = [
        actions[dest].option_strings[0]
        for dest, values in namespace.stored.items()
        if len({repr(value) for value in values}) > 1
    ]
    return namespace, unknown, repeated


def repeated_message(repeated: Sequence[str]) -> str:
    """The refusal of one-value flags given more than once with different values."""
    return (
        f"{', '.join(repeated)} given more than once, with different values: each takes one value, "
        "and the last would silently win. Pass each once"
    )


def without_switch_values(message: str) -> str:
    """argparse's error `message`, told how to pass a switch when it was given a value (`--overwrite=False`).

    argparse says only "argument --overwrite: ignored explicit argument 'False'", which
    reads as if the value were ignored and the run went on.
    """
    flag, found, value = message.removeprefix("argument ").partition(": ignored explicit argument ")
    if not found:
        return message
    value = value.rstrip(".").removeprefix("'").removesuffix("'")  # argparse quotes it as repr() does
    return (
        f"{flag}={value}: {flag} is a switch and takes no value; give {flag} alone to turn it on, or "
        "leave it out to keep it off"
    )


class CommandParser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` that takes no abbreviated flags and no repeated one-value flag,
    and refuses in one `error:` line.

    Its subcommands' parsers (`add_subparsers`) are of this class too.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        """Exits with one `error:` line saying where the help is, as `pipeline.run`'s refusals do.

        argparse printed its usage block (up to 16 lines) above `PROG: error: MESSAGE`.
        """
        unknown = message.partition("unrecognized arguments: ")[2].split()
        flags = [flag for action in self._actions for flag in action.option_strings]
        close = [
            f"{arg} (did you mean {match[0]}?)"
            for arg in unknown
            if arg.startswith("-") and (match := difflib.get_close_matches(arg.split("=", 1)[0], flags, n=1))
        ]
        hint = f"; {', '.join(close)}" if close else ""
        message = without_switch_values(message)
        self.exit(2, f"error: {message.rstrip('.')}{hint}. `{self.prog} --help` explains each flag.\n")

    def parse_known_args(  # type: ignore[override]  # typeshed's overloads; the behaviour is argparse's
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        args = join_negative_numbers(self, sys.argv[1:] if args is None else args)
        if not isinstance(namespace, _RecordingNamespace):  # Not the checking pass itself.
            _, _, repeated = parse_recording_repeats(self, args)
            if repeated:
                self.error(repeated_message(repeated) + ".")
        return super().parse_known_args(args, namespace)
