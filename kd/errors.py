"""User-facing errors.

Anything the user can fix (a config value, a path, a dataset column, a pickled checkpoint) raises a
subclass of `KDError`. The entry point prints its message as one line and exits non-zero; anything
else is a bug and keeps its traceback.
"""


def first_line(exc: BaseException, default: str | None = None) -> str:
    """The first line of an exception's message (or `default`, else its type name, when empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else (default or type(exc).__name__)


class KDError(Exception):
    """An error the user can fix; its message says what is wrong and what would be valid."""

    def __str__(self) -> str:
        # Raised in a DataLoader worker (audio decoded on access), the error is re-raised in the
        # main process with a message of "Caught DataError in DataLoader worker process 0" and the
        # worker's traceback; the user's message is that traceback's last line.
        text = super().__str__()
        if text.startswith("Caught ") and "Original Traceback" in text:
            last = text.strip().splitlines()[-1]
            return last.split(": ", 1)[1] if last.startswith("kd.errors.") and ": " in last else last
        return text


class ConfigError(KDError):
    """One or more config problems, all reported at once."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        where = f" in {source}" if source else ""
        if len(self.problems) == 1:
            message = f"config error{where}: {self.problems[0]}"
        else:
            listed = "\n".join(f"  - {p}" for p in self.problems)
            message = f"{len(self.problems)} config errors{where}:\n{listed}"
        super().__init__(message)


class SourceError(KDError):
    """Models or data the run needs that cannot be had now (not cached, not downloadable), all at once."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        if len(self.problems) == 1:
            super().__init__(self.problems[0])
        else:
            listed = "\n".join(f"  - {p}" for p in self.problems)
            super().__init__(f"{len(self.problems)} things this run needs cannot be had:\n{listed}")


class DataError(KDError):
    """The dataset cannot be loaded or does not have what the config names."""


class ModelLoadError(KDError):
    """A teacher or student cannot be loaded safely (missing, pickled, corrupt, incompatible)."""


class TrainingError(KDError):
    """Training cannot go on (non-finite loss, empty batch, missing device)."""
