"""How a stage shows its progress: a tqdm bar when stderr is a terminal, and plain lines otherwise.

A bar in a SLURM .out file or a piped log is thousands of carriage-return fragments; there, one line per log
window (kimg, loss, images/s, ETA) is what a person reads with `less`. Messages go through `say`, which
prints above an active bar instead of onto its line.
"""
import sys
import time

from tqdm import tqdm


def say(message: str) -> None:
    """Print a line to stderr without breaking an active progress bar."""
    tqdm.write(message, file=sys.stderr)


class Progress:
    """Progress of one training run in images; shown on the main process only (`enabled`)."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool = True):
        self.total, self.desc, self.enabled = total, desc, enabled
        self.start, self.t0 = initial, time.time()
        self.bar = None
        if enabled and sys.stderr.isatty():
            self.bar = tqdm(total=total, initial=initial, unit="img", unit_scale=True, smoothing=0.1,
                            desc=desc, dynamic_ncols=True, file=sys.stderr)

    def advance(self, nimg: int) -> None:
        """Every step; host-side only."""
        if self.bar is not None:
            self.bar.update(nimg - self.bar.n)

    def log(self, nimg: int, metrics: dict) -> None:
        """At every log window: the bar's loss, or one plain line."""
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        elif self.enabled:
            rate = (nimg - self.start) / max(time.time() - self.t0, 1e-9)
            eta = (self.total - nimg) / rate if rate > 0 else float("inf")
            say(f"{self.desc}: {nimg / 1000:.1f}/{self.total / 1000:g} kimg, loss {metrics['loss']:.4f}, "
                f"{metrics['images_per_s']:.0f} img/s, ETA {_duration(eta)}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
