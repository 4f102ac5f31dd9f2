"""SIGTERM, SIGUSR1 and Ctrl-C -> a checkpoint at the next step boundary and a distinct exit code.

The handler only sets a flag; the training loop looks at it between steps, where the state is consistent,
and all ranks agree through Accelerate's trigger (one rank signalled is enough). SLURM sends SIGTERM on
preemption and `scontrol requeue`, and USR1 (via --signal=B:USR1@N, forwarded by the batch script) ahead of
a time limit; both exit with 75, which the batch script requeues. Ctrl-C (SIGINT) checkpoints the same way
and exits with 130, the shell's code for an interrupt, which is not requeued.
"""
import signal

# The exit code of a stage that checkpointed because it was asked to stop. It tells a batch script
# to requeue (EX_TEMPFAIL from sysexits.h: "try again later").
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130  # 128 + SIGINT


class StopRequest:
    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)):
        self.signum: int | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum, frame):
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return EXIT_INTERRUPTED if self.signum == signal.SIGINT else EXIT_PREEMPTED

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)

