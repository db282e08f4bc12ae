"""The command line of every entry point: arguments parsed into typed dataclasses, and
number checks, all made before anything is loaded or written.  A bad command line is an
`ArgumentError` (one line naming the fix, exit code 2, see errors.py), never argparse's
usage text or a traceback.  Flags are matched exactly: `--save_step 5` is an unknown flag
(named with its closest valid one), not a silent abbreviation of --save_steps."""
from __future__ import annotations

import dataclasses
import difflib
import math

from tamt_ds.errors import InputError


class ArgumentError(InputError):
    pass


def parse_arguments(types: tuple, argv: list[str] | None = None, defaults: dict | None = None) -> tuple:
    """One instance of each dataclass in `types`, from `argv` (default: sys.argv[1:])."""
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        def error(self, message):  # argparse would print its usage and exit
            raise ArgumentError(f"{message} (see --help)")

    parser = Parser(types, allow_abbrev=False)
    if defaults:
        parser.set_defaults(**defaults)
    *parsed, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        raise ArgumentError(_unknown_message(unknown, [s for a in parser._actions for s in a.option_strings]))
    return tuple(parsed)


def _unknown_message(unknown: list[str], flags: list[str]) -> str:
    first = unknown[0].split("=", 1)[0]
    if not first.startswith("-"):
        return f"unexpected argument {first!r}: every value follows the --flag it sets (see --help)"
    spelled = [f for f in flags if "-" not in f[2:]]  # --save_steps, not its alias --save-steps
    close = difflib.get_close_matches(first, spelled, n=1, cutoff=0.6)
    fix = f"did you mean {close[0]}?" if close else "see --help for the arguments"
    return f"unknown argument {first}: {fix}"


def check_at_least(args, minimum: float, names: tuple[str, ...], error: type[InputError] = ArgumentError) -> None:
    """Every named field of `args` (None: left out, allowed) is a number >= `minimum`; checked
    before anything runs, so that a 0 interval cannot stop a run half-way (a modulo by zero)."""
    defaults = {f.name: f.default for f in dataclasses.fields(args)}
    for name in names:
        value = getattr(args, name)
        if value is None or (value >= minimum and not (isinstance(value, float) and math.isnan(value))):
            continue
        default = defaults.get(name)
        example = f" (default {default:g})" if isinstance(default, (int, float)) and default >= minimum else ""
        raise error(f"--{name} must be at least {minimum:g}, got {value}: pass --{name} {minimum:g} or more{example}")
