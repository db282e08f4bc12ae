"""The command line of every entry point: arguments parsed into typed dataclasses, and
number checks, all made before anything is loaded or written.  A bad command line is an
`ArgumentError` (one line naming the fix, exit code 2, see errors.py), never argparse's
usage text or a traceback.  Flags are matched exactly: `--save_step 5` is an unknown flag
(named with its closest valid one), not a silent abbreviation of --save_steps."""
from __future__ import annotations

import dataclasses
import difflib
import math
import sys
from dataclasses import dataclass, field

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


@dataclass
class PreflightArguments:
    """`--preflight_world_size N` on any entry point: check the job for N ranks and exit
    (tamt_ds/preflight.py); the other flags here size what it is checked against."""
    preflight_world_size: int = field(default=1, metadata={
        "help": "check, in this one process, everything the job needs on N ranks; exit 0 (would start and fit) or 2"})
    gpu_memory_gb: float = field(default=80.0, metadata={"help": "memory of one GPU (default: 80, an A100/H100)"})
    ranks_per_node: int = field(default=8, metadata={"help": "GPUs per node, for host memory per node"})
    host_memory_gb: float | None = field(default=None, metadata={"help": "host memory of one node (default: not checked)"})


PREFLIGHT_FLAG = "--preflight_world_size"


def split_preflight(argv: list[str] | None = None) -> tuple[PreflightArguments | None, list[str]]:
    """(the pre-flight's arguments, the job's own) when --preflight_world_size is given, else
    (None, argv unchanged): without it, --gpu_memory_gb and the rest stay unknown flags of the job."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a.split("=", 1)[0] == PREFLIGHT_FLAG for a in argv):
        return None, argv
    ours_flags = {f"--{f.name}" for f in dataclasses.fields(PreflightArguments)}
    ours, job, i = [], [], 0
    while i < len(argv):
        take = 1 if "=" in argv[i] or argv[i].split("=", 1)[0] not in ours_flags else 2
        (ours if argv[i].split("=", 1)[0] in ours_flags else job).extend(argv[i:i + take])
        i += take
    (preflight,) = parse_arguments((PreflightArguments,), ours)
    check_at_least(preflight, 1, ("preflight_world_size", "ranks_per_node"))
    check_at_least(preflight, 0.1, ("gpu_memory_gb", "host_memory_gb"))
    return preflight, job
