"""User errors and the command-line wrapper every entry point uses (`rlad-train`, `rlad-eval`, the converters).

A `UserError` is bad input: a file or flag the user can fix. Its message starts with that file/flag, so the
wrapper prints exactly one line and exits with code 2 (argparse's code for bad usage):

    rlad-train: error: --prompt-data data/train.jsonl:3: invalid JSON (Expecting ',' delimiter at column 20)

Anything else is a bug and keeps its traceback. `RLAD_DEBUG=1` (or `--debug` on the command line, removed before
the entry point parses its flags) prints the traceback of user errors too.

Under torchrun every rank validates the same files, so every rank raises the same error. Only global rank 0
prints it (`RANK` from torchrun's environment, so this also works before `torch.distributed` is initialised) and
exits 2 at once. Another rank first waits `NONZERO_RANK_GRACE_S` (env `RLAD_ERROR_GRACE_S`): torchrun stops the
remaining workers as soon as rank 0 has exited, so in the usual case the line appears once. A rank still alive
after the grace period failed alone (rank 0 did not), so it prints its own error, tagged `[rank N]`, and exits 2.
torchrun itself then prints its `ChildFailedError` summary (rank 0's exitcode 2 as the root cause) below the
launcher's own traceback; that is torchrun's report, not the job's.

This module imports nothing from the package: every layer may raise `UserError`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import NoReturn, TypeVar

T = TypeVar("T")
EXIT_USER_ERROR = 2
DEBUG_ENV = "RLAD_DEBUG"
DEBUG_FLAG = "--debug"
NONZERO_RANK_GRACE_S = 30.0  # ranks reach the same check seconds apart (imports on a busy node)
GRACE_ENV = "RLAD_ERROR_GRACE_S"


class UserError(ValueError):
    """Bad input the user can fix. The message names the file/flag first: `--flag VALUE: what is wrong, what was
    expected` or `path/to/file: ...` (`where=` prepends it)."""

    def __init__(self, message: str, *, where: str | None = None) -> None:
        super().__init__(f"{where}: {message}" if where else message)


class OutputExistsError(UserError, FileExistsError):
    """The output path exists and overwriting was not asked for."""


class RankLocalError(UserError):
    """A limit a flag sets, hit by some ranks only (e.g. ranks that waited for a straggler longer than
    --distributed-timeout-minutes): whichever rank raises it prints it at once."""


def one_line(message: str) -> str:
    """A multi-line message (e.g. a list of mismatched fields) joined into one line with `; `."""
    parts = [p.strip() for p in str(message).splitlines() if p.strip()]
    return "; ".join(parts).replace(":;", ":")


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def global_rank() -> int:
    """This process's global rank: torch.distributed when initialised, else torchrun's RANK (0 without torchrun)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


@contextlib.contextmanager
def as_user_error(*types: type[BaseException], flag: str | None = None) -> Iterator[None]:
    """Inside the block, exceptions of `types` become `UserError`s (e.g. flag validation's ValueErrors), and with
    `flag` every user error's message is prefixed by it unless it starts with it already: `flag="--data"` for
    messages that start with the file (`--data x.jsonl:3: invalid JSON`), `flag="--reward nope:"` otherwise."""
    try:
        yield
    except (UserError, *types) as e:
        message = str(e)
        if flag and not message.startswith(flag):
            message = f"{flag} {message}"
        if isinstance(e, UserError) and message == str(e):
            raise
        raise UserError(message) from e


def report(prog: str, err: BaseException, *, rank: int | None = None, stream=None) -> None:
    """Print `prog: error: <message>` as one line (the traceback too when debugging)."""
    stream = stream or sys.stderr
    if debug_enabled():
        traceback.print_exception(err, file=stream)
    tag = f"[rank {rank}] " if rank else ""
    print(f"{prog}: error: {tag}{one_line(str(err))}", file=stream, flush=True)


def exit_user_error(prog: str, err: BaseException) -> NoReturn:
    """Print (rank 0 now, another rank after the grace period) and exit with code 2 on every rank."""
    rank = global_rank()
    if rank != 0 and not isinstance(err, RankLocalError):
        # torchrun stops this worker meanwhile when rank 0 failed the same way
        time.sleep(float(os.environ.get(GRACE_ENV, NONZERO_RANK_GRACE_S)))
    report(prog, err, rank=rank)
    sys.exit(EXIT_USER_ERROR)


def run_cli(prog: str, main: Callable[[list[str]], T], argv: Sequence[str] | None = None, *,
            user_errors: tuple[type[BaseException], ...] = ()) -> T:
    """Call `main(argv)` (default `sys.argv[1:]`); a `UserError` (or one of `user_errors`) becomes one line on
    stderr and exit code 2. `--debug` in argv is removed and turns on tracebacks (as `RLAD_DEBUG=1`)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if DEBUG_FLAG in args:
        args.remove(DEBUG_FLAG)
        os.environ[DEBUG_ENV] = "1"
    try:
        return main(args)
    except (UserError, *user_errors) as err:
        exit_user_error(prog, err)
