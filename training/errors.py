"""The exceptions that end a run, and the one place that turns them into a script's exit: library code raises, only
scripts exit (`exits_like_a_script`)."""
import errno
import functools
import sys

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


def script_errors() -> tuple:
    """The exceptions a script reports as `error: <message>` (exit 1): the run's, and the encoder package's for a
    --model it does not have and a checkpoint that cannot be read or does not fit (once the package is loaded: a
    script's checks before torch is imported raise only the run's)."""
    if "dmjd_encoders.pretrained" not in sys.modules:
        return (RunError,)
    from dmjd_encoders.models_convvit import UnknownModelError  # the package does not import training
    from dmjd_encoders.pretrained import PretrainedWeightsError
    return RunError, PretrainedWeightsError, UnknownModelError


def exits_like_a_script(main):
    """`main(args)` of a script: a RunError (or a pre-trained checkpoint that does not fit) ends it with
    `error: <message>` and status 1, as does a full disk (whose message names the file and what was kept),
    Preempted with status 75."""
    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except Preempted:
            raise SystemExit(REQUEUE_EXIT_CODE) from None
        except script_errors() as err:
            raise SystemExit(f"error: {err}") from None
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
            raise SystemExit(f"error: {err.strerror}") from None
    return run
