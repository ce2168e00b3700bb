from __future__ import annotations

import os

import pytest

from synthtune.child import ChildError, call_in_child


def test_returns_the_value_from_another_process():
    assert call_in_child(os.getpid) != os.getpid()


def test_reraises_with_the_child_traceback():
    with pytest.raises(ChildError, match=r"(?s)ValueError: invalid literal.*in child process"):
        call_in_child(int, "not a number")


def _logs_something() -> str:
    import logging

    logging.getLogger("distilabel.pipeline").warning("from the pipeline")
    logging.getLogger("elsewhere").warning("not forwarded")
    return "done"


def test_child_log_records_of_one_logger_reach_the_parent():
    records = []
    assert call_in_child(_logs_something, on_log=records.append, log_name="distilabel") == "done"
    assert [(r.name, r.getMessage()) for r in records] == [("distilabel.pipeline", "from the pipeline")]
