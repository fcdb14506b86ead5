"""Long jobs log a progress meter (count, rate, ETA) at intervals and once at the end."""

import logging

from mergeflow.progress import Progress


def test_progress_logs_a_meter_with_rate_and_eta_at_intervals_and_at_the_end(caplog):
    caplog.set_level(logging.INFO, logger="mergeflow")
    meter = Progress("zoo pretrain", 5, "step", every_s=3600.0)
    for step in range(5):
        meter.update(postfix=f"loss {1.0 / (step + 1):.2f}")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1  # the interval never passed: only the final line
    assert lines[0].startswith("zoo pretrain: 100%|") and "5/5" in lines[0] and "step/s" in lines[0]
    assert "loss 0.20" in lines[0]
    caplog.clear()
    every = Progress("IRT fit", 3, "step", every_s=0.0)
    every.update()
    assert "1/3" in caplog.records[0].getMessage() and "<" in caplog.records[0].getMessage()  # elapsed<ETA
