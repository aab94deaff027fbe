"""integer_list.py: the one reading of a typed-in list of whole numbers (MasaCtrl's layers and token
inputs, the runner's block lists). No ComfyUI needed."""

import subprocess
import sys

import pytest

from conftest import REPO
from consistent_synthesis.integer_list import MAX_DIGITS, parse_integer_list


def short(value):
    return value if len(str(value)) <= 20 else f"{len(value)}-chars"


def parse(text):
    return parse_integer_list(text, "Node", "layers", "10, 12, 14")


@pytest.mark.parametrize("text, expected", [
    ("10", [10]), (" 1, 2 ,5", [1, 2, 5]), ("0; 56", [0, 56]), ("10;12, 14", [10, 12, 14]),
    ("0,1,17,18,25", [0, 1, 17, 18, 25]), ("\t3 ,\n4", [3, 4]), ("007", [7]), ("", []), ("   ", []),
    ("9" * MAX_DIGITS, [int("9" * MAX_DIGITS)]),
], ids=short)
def test_well_formed_lists_read_as_before(text, expected):
    assert parse(text) == expected


@pytest.mark.parametrize("text, problem", [
    ("1,,2", "empty item"), (",", "empty item"), ("0,", "empty item"), (", 3", "empty item"), ("1;;2", "empty item"),
    ("1, ,2", "empty item"), ("-1", "-1 is negative"), ("1.5", "'1.5' is not a number"), ("hand", "not a number"),
    ("1 2", "'1 2' is not a number"), ("²", "not a number"), ("١٢", "not a number"), ("+3", "not a number"),
    ("1\ud800", "not a number"), ("9" * (MAX_DIGITS + 1), f"{MAX_DIGITS + 1} digits"),
    ("9" * 10000, "10000 digits"),
], ids=short)
def test_malformed_lists_are_errors_naming_node_input_value_and_an_example(text, problem):
    with pytest.raises(ValueError) as caught:
        parse(text)
    message = str(caught.value)
    assert message.startswith("Node: input 'layers': ")
    assert problem in message
    assert "e.g. '10, 12, 14'" in message
    shown = repr(text[:40])
    assert shown in message
    assert len(message) < 400  # the 10,000-digit value is cut, not echoed
    message.encode("utf-8")  # a lone surrogate in the value is escaped, so the message can be sent and logged


def test_a_value_that_is_not_text_is_an_error():
    with pytest.raises(ValueError, match=r"^Node: input 'layers': expected text such as '10, 12, 14', got list"):
        parse([1, 2])


def test_the_runner_started_as_a_top_level_package_imports_the_same_parser():
    """``python -m runner`` in the pack's folder: runner is a top-level package and cannot import
    ``..integer_list``; it falls back to the pack folder's top-level module."""
    done = subprocess.run([sys.executable, "-c", "import runner.random_models as r; "
                           "print(r.parse_integer_list('0; 56', 'N', 'layers', 'x'))"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[0, 56]"
