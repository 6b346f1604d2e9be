"""Training progress as log lines: what a notebook shows with log_progress (training.loop)."""

import io
import logging

from resemul_core.training import loop


def test_log_progress_prints_the_training_loggers_and_restores_them():
    target = logging.getLogger("resemul_core.training")
    level, handlers = target.level, list(target.handlers)
    stream = io.StringIO()
    with loop.log_progress(stream):
        logging.getLogger("resemul_core.training.state").info("epoch %d: val loss %.4f", 3, 0.5)
        logging.getLogger("resemul_core.training.loop").debug("not shown")
        logging.getLogger("resemul_core.data").info("another package part: not shown")
    logging.getLogger("resemul_core.training.state").info("after: not shown")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].endswith("epoch 3: val loss 0.5000")
    assert target.level == level and target.handlers == handlers


def test_progress_lines_are_spaced_in_time():
    assert loop.PROGRESS_EVERY_S >= 60  # a few lines per epoch at most in an executed notebook
