"""Errors that csc reports to the user as one clear line (the CLI prints them without a traceback)."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message: enough to name the cause inside one of our errors."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


class CscError(Exception):
    """Base class: a problem the user can fix, described in the message."""


class SpecError(CscError):
    """A spec file or field is invalid. The message names the file and the field."""


class InputError(CscError):
    """A model, layer, corpus or file named by the spec cannot be used."""


class CacheError(CscError):
    """An on-disk artefact (activation shard, checkpoint) failed its integrity check."""


class DivergenceError(CscError):
    """Training produced NaN or inf. The message names the step and the loss term."""
