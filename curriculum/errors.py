"""The errors the recipe turns into exit codes (its main()); shared by the helpers."""


class ConfigError(ValueError):
    """A problem the user fixes in the YAML, the command line or the data; printed without a traceback. Exit 2."""


class CurriculumError(RuntimeError):
    """The adapter about to train is not the one it must be (frozen, duplicated, fresh, altered); exit 1."""


class StageStopped(Exception):
    """Training stopped before the end on purpose (a signal); a checkpoint to resume from was saved."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class DiskFull(RuntimeError):
    """The disk filled up while writing a checkpoint or the stage; what was saved before is intact. Exit 4."""
