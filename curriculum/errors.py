"""The errors the recipe turns into exit codes (its main()); shared by the helpers."""


class ConfigError(ValueError):
    """A problem the user fixes in the YAML, the command line or the data; printed without a traceback. Exit 2."""

    exit_code = 2


class CurriculumError(RuntimeError):
    """The adapter about to train is not the one it must be (frozen, duplicated, fresh, altered); exit 1."""

    exit_code = 1


class StageStopped(Exception):
    """Training stopped before the end on purpose (a signal); a checkpoint to resume from was saved."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class DiskFull(RuntimeError):
    """The disk filled up while writing a checkpoint or the stage; what was saved before is intact. Exit 4."""

    exit_code = 4


def out_of_memory_message(err: BaseException, where: str) -> str:
    """What to change when a GPU ran out of memory (`where`: which process, when there are several)."""
    return (f"error: {where}out of GPU memory. Lower memory_budget_gib (with batch_size: auto) or batch_size "
            "(and raise grad_accum to keep the effective batch), lower max_pixels (fewer image tokens), set "
            "gradient_checkpointing: true, or lower eval_batch_size if it happened during evaluation.\n"
            f"({str(err).splitlines()[0]})")
