"""One hierarchy for every error a user can cause and fix.

Each message names the problem and the fix. All are ``ValueError`` subclasses (bad values);
the "not found" / "exists" ones are also the matching ``OSError``. The command line catches
`MiloraError` once, prints ``milora <command>: error: <message>`` and exits with status 2
(``milora --debug`` or ``MILORA_DEBUG=1`` also prints the traceback with its chained causes).

Raise them ``from`` the error they translate, so that the cause survives for ``--debug``.
"""


class MiloraError(ValueError):
    """Input that milora cannot use."""


class ConfigError(MiloraError):
    """A run or sweep configuration that cannot be run (unknown key, wrong type, bad value)."""


class UsageError(ConfigError):
    """An option or argument used wrongly: a bad value, or options that cannot go together."""


class DataError(MiloraError):
    """Training or evaluation data that cannot be used (missing file, bad record, unparseable answer)."""


class ModelError(MiloraError):
    """A model, its target modules or a device unfit for the requested adapter."""


class AdapterError(MiloraError):
    """A saved adapter that cannot be loaded (incomplete, corrupt, for another base)."""


class AdapterNotFoundError(AdapterError, FileNotFoundError):
    """An adapter directory or one of its files does not exist."""


class ServerError(MiloraError):
    """An OpenAI-compatible server that cannot be used: unreachable, serving another model, failed requests."""


class OutputError(MiloraError):
    """An output path milora must not or cannot write (exists, is a file, held by another run)."""


class OutputInUseError(OutputError):
    """An output directory held (`milora.io.RunLock`) by another live process: not a failure of this run."""


class StoppedError(MiloraError):
    """Stopped by the user (Ctrl-C) after the work in flight was saved: re-running continues it."""


class OutputExistsError(OutputError, FileExistsError):
    """The output path already holds something milora will not replace."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A data file or directory does not exist."""


SHOWN_CHARACTERS = 200
"""The most of a user's value an error message echoes (a 1 MB value is cut, not printed whole)."""


def shown(value: object, limit: int = SHOWN_CHARACTERS) -> str:
    """``repr(value)`` for an error message, at most about ``limit`` characters: long strings and
    large containers are elided (`reprlib`, which never builds the whole text), a long string's
    length is said."""
    import reprlib

    short = reprlib.Repr()
    short.maxstring = short.maxother = limit
    short.maxlist = short.maxtuple = short.maxdict = short.maxset = 8
    short.maxlevel = 3
    text = short.repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    if isinstance(value, str) and len(value) > limit:
        text += f" ({len(value)} characters)"
    return text
