"""The one reading of a typed-in list of whole numbers: MasaCtrl's ``layers``, ``source_tokens``
and ``target_tokens`` (``"10, 12, 14"``), and the runner where it rewrites such a list.

One rule for every such input: ASCII digits only, items separated by ',' or ';', spaces around
them allowed; a blank string is the empty list. An empty item (``"1,,2"``, ``","``, ``"3,"``), a
sign, a non-ASCII digit (``"²"``) or an item of more than ``MAX_DIGITS`` digits is an error that
names the node, the input, the value and a valid example, so a typo is never read as another
list. Imports nothing: the runner, started as a top-level package, imports it too.
"""

from __future__ import annotations

import re

SEPARATORS = ",;"
# Layer and token numbers are below a few thousand; 6 digits keeps int() far from Python's
# int-conversion limit (4300 digits) and from a number that could index anything.
MAX_DIGITS = 6
_SHOWN = 40


def _shown(text: str) -> str:
    """The value as the error shows it: quoted and escaped (no raw control or surrogate characters),
    cut to about 40 characters."""
    return repr(text[:_SHOWN]) + ("..." if len(text) > _SHOWN else "")


def parse_integer_list(text: str, node: str, input_name: str, example: str) -> list[int]:
    """``"1, 2;5"`` -> ``[1, 2, 5]``; ``""`` -> ``[]``. Anything else raises
    ``ValueError("<node>: input '<input_name>': ...")`` naming the value and ``example``."""
    if not isinstance(text, str):
        raise ValueError(f"{node}: input '{input_name}': expected text such as {example!r}, got "
                         f"{type(text).__name__}.")
    if not text.strip():
        return []

    def refuse(problem: str) -> ValueError:
        return ValueError(f"{node}: input '{input_name}': {_shown(text)} is not a list of whole numbers: "
                          f"{problem}. Write numbers separated by commas, e.g. {example!r}.")

    numbers = []
    for item in re.split(f"[{SEPARATORS}]", text):
        item = item.strip()
        if not item:
            raise refuse("it has an empty item (a doubled, leading or trailing ',' or ';')")
        if re.fullmatch(r"-[0-9]+", item):
            raise refuse(f"{item} is negative; these numbers count from 0")
        if not re.fullmatch(r"[0-9]+", item):
            raise refuse(f"{_shown(item)} is not a number written with the digits 0-9")
        if len(item) > MAX_DIGITS:
            raise refuse(f"a number of {len(item)} digits is far past any layer or token (at most "
                         f"{MAX_DIGITS} digits)")
        numbers.append(int(item))
    return numbers
