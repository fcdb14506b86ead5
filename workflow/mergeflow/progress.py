"""Progress a person can follow in a long job's log: tqdm's meter (bar, count, rate, elapsed and
ETA) written as a log line at most every few seconds, and once at the end."""

from __future__ import annotations

import logging
import time

from tqdm import tqdm

log = logging.getLogger("mergeflow.progress")


class Progress:
    """``update()`` after each unit of work; ``postfix`` (e.g. the current loss) rides along."""

    def __init__(self, desc: str, total: int, unit: str = "it", every_s: float = 10.0,
                 logger: logging.Logger = log):
        self.desc, self.total, self.unit, self.every_s, self.logger = desc, int(total), unit, every_s, logger
        self.done = 0
        self.started = self.last = time.perf_counter()

    def update(self, n: int = 1, postfix: str = "") -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every_s or self.done >= self.total:
            self.last = now
            self.logger.info("%s", self.line(now - self.started, postfix))

    def line(self, elapsed: float, postfix: str = "") -> str:
        return tqdm.format_meter(self.done, self.total, elapsed, ncols=100, prefix=self.desc, unit=self.unit,
                                 ascii=True, postfix=postfix or None)
