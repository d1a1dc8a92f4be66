"""Progress of long work as a user reads it: one display that redraws itself on a terminal, plain
lines that a log file keeps readable elsewhere."""

from __future__ import annotations

import os
import sys
import time

from tqdm.auto import tqdm


def on_terminal() -> bool:
    """Whether progress goes to a terminal (stderr), where redrawing bars are readable."""
    return sys.stderr.isatty()


def plain_output_for_logs() -> None:
    """Off a terminal, turns off the progress bars that the dependencies draw (transformers'
    loading and saving, lm-eval's requests, datasets): each would write its redraws into the log.
    Called by the commands (not on import), for their own process and the workers it starts."""
    if on_terminal():
        return
    import datasets
    import transformers

    os.environ["TQDM_DISABLE"] = "1"  # tqdm reads it in every bar, also in worker processes
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


class Progress:
    """``total`` steps of ``description``: a tqdm bar on a terminal; elsewhere a line at most every
    ``interval`` seconds and one at the end, e.g. ``distil layer-wise: 40/200 mse=0.012``."""

    def __init__(self, total: int, description: str, interval: float = 10.0, enabled: bool = True) -> None:
        self.total, self.description, self.interval, self.enabled = total, description, interval, enabled
        self.done, self.status, self.printed, self.last_line = 0, "", time.monotonic(), ""
        self.bar = (
            tqdm(total=total, desc=description, dynamic_ncols=True) if enabled and on_terminal() else None
        )

    def update(self, steps: int = 1, status: str = "") -> None:
        self.done += steps
        self.status = status
        if self.bar is not None:
            self.bar.update(steps)
            self.bar.set_postfix_str(status)
        elif self.enabled and time.monotonic() - self.printed >= self.interval:
            self._print()

    def set(self, done: int, description: str | None = None) -> None:
        """Moves to ``done`` steps (and a new description). Off a terminal a new description is
        printed at once, new steps at most every ``interval`` seconds."""
        renamed = description is not None and description != self.description
        moved = done != self.done
        self.done, self.description = done, description or self.description
        if self.bar is not None:
            self.bar.n = done
            self.bar.set_description(self.description)
            self.bar.refresh()
        elif self.enabled and (renamed or (moved and time.monotonic() - self.printed >= self.interval)):
            self._print()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            self._print()

    def _print(self) -> None:
        status = f" {self.status}" if self.status else ""
        line = f"{self.description}: {self.done}/{self.total}{status}"
        if line != self.last_line:  # the closing line repeats nothing already printed
            print(line, file=sys.stderr, flush=True)
        self.printed, self.last_line = time.monotonic(), line
