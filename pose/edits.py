"""Keypoint edits: the JSON that the pose editor (or a person) writes into PoseEditOutpaint's ``edits``.

A JSON list of operations applied in order; coordinates are pixels of the padded canvas:

- ``{"op": "set", "person": P, "part": "body"|"face"|"hand_left"|"hand_right", "index": I, "x": X, "y": Y}``
  moves a point, or adds it when missing (its confidence becomes 1);
- ``{"op": "remove", "person": P, "part": ..., "index": I}`` makes the point missing (0, 0, 0);
- ``{"op": "translate", "person": P, "dx": DX, "dy": DY}`` moves every present point of a person;
- ``{"op": "mirror", "person": P}`` swaps the person's left and right points (body, hands): labels
  swap, positions stay.

An empty text means no edits. Unknown operations or fields, bad indices, non-finite numbers, more
than 10,000 operations or more than 1 MB of text are refused with a ``PoseError`` (a ValueError).
"""

from __future__ import annotations

import numpy as np

from .openpose import MAX_COORDINATE, MAX_PEOPLE, MAX_TEXT, PARTS, Frame, PoseError, finite, parse_text

MAX_OPERATIONS = 10_000
# OpenPose 18 left/right pairs: shoulders, elbows, wrists, hips, knees, ankles, eyes, ears.
BODY_MIRROR = [(2, 5), (3, 6), (4, 7), (8, 11), (9, 12), (10, 13), (14, 15), (16, 17)]
FIELDS = {"set": {"op", "person", "part", "index", "x", "y"}, "remove": {"op", "person", "part", "index"},
          "translate": {"op", "person", "dx", "dy"}, "mirror": {"op", "person"}}


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


def parse(text: str) -> list[dict]:
    """The list of operations in ``text``, validated (an empty text is no edits)."""
    if text is None:
        return []
    if not isinstance(text, str):
        raise PoseError(f"edits must be JSON text, got {type(text).__name__}")
    if len(text) > MAX_TEXT:  # before strip() copies it
        raise PoseError(f"the edits text has {len(text):,} characters; at most {MAX_TEXT:,} bytes are accepted")
    if not text.strip():
        return []
    ops = parse_text(text)
    if not isinstance(ops, list):
        raise PoseError("edits must be a JSON list of operations")
    if len(ops) > MAX_OPERATIONS:
        raise PoseError(f"{len(ops):,} operations; at most {MAX_OPERATIONS:,}")
    for n, op in enumerate(ops):
        where = f"operation {n}"
        if not isinstance(op, dict) or not isinstance(op.get("op"), str) or op["op"] not in FIELDS:
            raise PoseError(f"{where} must be an object with \"op\" one of {sorted(FIELDS)}")
        missing = FIELDS[op["op"]] - set(op)
        extra = set(op) - FIELDS[op["op"]]
        if missing or extra:
            raise PoseError(f"{where} ({op['op']}): missing {sorted(missing)}, unknown {sorted(extra)}")
        for key, top in (("person", MAX_PEOPLE - 1), ("index", max(count for _, count in PARTS.values()) - 1)):
            if key in op and not (isinstance(op[key], int) and not isinstance(op[key], bool)
                                  and 0 <= op[key] <= top):
                raise PoseError(f"{where}: {key} must be a whole number from 0 to {top}, got {_shown(op[key])}")
        for key in ("x", "y", "dx", "dy"):
            if key in op and not finite(op[key]):
                raise PoseError(f"{where}: {key} must be a finite number of pixels within +-{MAX_COORDINATE:g}, "
                                f"got {_shown(op[key])}")
        if "part" in op and not (isinstance(op["part"], str) and op["part"] in PARTS):
            raise PoseError(f"{where}: part must be one of {sorted(PARTS)}, got {_shown(op['part'])}")
    return ops


def apply(frame: Frame, ops: list[dict]) -> Frame:
    """A copy of ``frame`` with ``ops`` applied; an operation on a person or point that does not
    exist is an error that names it."""
    out = frame.copy()
    for n, op in enumerate(ops):
        if op["person"] >= len(out.people):
            raise PoseError(f"operation {n}: person {op['person']} does not exist (the pose has "
                            f"{len(out.people)} people)")
        person = out.people[op["person"]]
        kind = op["op"]
        if kind in ("set", "remove"):
            count = PARTS[op["part"]][1]
            if op["index"] >= count:
                raise PoseError(f"operation {n}: {op['part']} has points 0 to {count - 1}, not {op['index']}")
            points = person.part(op["part"])
            if points is None:
                if kind == "remove":
                    continue
                points = np.zeros((count, 3))
                setattr(person, op["part"], points)
            points[op["index"]] = (op["x"], op["y"], 1.0) if kind == "set" else (0.0, 0.0, 0.0)
        elif kind == "translate":
            person.move(1.0, 1.0, op["dx"], op["dy"])
        else:
            for a, b in BODY_MIRROR:
                person.body[[a, b]] = person.body[[b, a]]
            person.hand_left, person.hand_right = person.hand_right, person.hand_left
    return out
