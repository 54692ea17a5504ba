"""The exceptions that end a run, and the one place that turns them into a script's exit: library code raises, only
scripts exit (`exits_like_a_script`)."""
import errno
import functools

from training.signals import REQUEUE_EXIT_CODE  # noqa: F401 (EX_TEMPFAIL: stopped on request, to be continued)


class RunError(Exception):
    """A run cannot start or go on; the message says why and what to do. A script prints it as `error: <message>`
    and exits with status 1."""


class FlagError(RunError, ValueError):
    """A flag's value is wrong; the message starts with the flag."""


class NonFiniteLossError(RunError):
    """A non-finite loss (or gradient) that the run may not skip; the last good checkpoint is kept."""


class Preempted(Exception):
    """The run stopped on a signal after saving its last step: a script exits with status 75, "requeue me"."""


def flag_error(flag: str, why: str) -> FlagError:
    return FlagError(f"{flag} {why}")


def is_script_error(err: BaseException) -> bool:
    """Whether a script reports `err` as `error: <message>` (exit 1): the run's errors, and the encoder package's (a
    --model it does not have, a checkpoint that cannot be read or does not fit: dmjd_encoders.errors). The package is
    imported only to ask: a run's error answers before it (a script's checks before torch stay torch-free), and an
    error raised by the package finds it loaded; where it cannot be imported, no error is its."""
    if isinstance(err, RunError):
        return True
    try:
        from dmjd_encoders.errors import EncoderError  # the package does not import training
    except ImportError:
        return False
    return isinstance(err, EncoderError)


def exits_like_a_script(main):
    """`main(args)` of a script: a RunError (or the encoder package's error: a --model it does not have, a checkpoint
    that cannot be read or does not fit) ends it with `error: <message>` and status 1, as does a full disk (whose
    message names the file and what was kept), Preempted with status 75."""
    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except Preempted:
            raise SystemExit(REQUEUE_EXIT_CODE) from None
        except Exception as err:
            if is_script_error(err):
                raise SystemExit(f"error: {err}") from None
            if isinstance(err, OSError) and err.errno == errno.ENOSPC:
                raise SystemExit(f"error: {err.strerror}") from None
            raise
    return run
