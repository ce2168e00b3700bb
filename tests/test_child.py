from __future__ import annotations

import os

import pytest

from synthtune.child import ChildError, call_in_child


def test_returns_the_value_from_another_process():
    assert call_in_child(os.getpid) != os.getpid()


def test_reraises_with_the_child_traceback():
    with pytest.raises(ChildError, match=r"(?s)ValueError: invalid literal.*in child process"):
        call_in_child(int, "not a number")
