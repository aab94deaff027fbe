"""Keypoint edits: the JSON that the pose editor (or a person) writes into PoseEditOutpaint's ``edits``.

A JSON list of operations applied in order; coordinates are pixels of the padded canvas:

- ``{"op": "set", "person": P, "part": "body"|"face"|"hand_left"|"hand_right", "index": I, "x": X, "y": Y}``
  moves a point, or adds it when missing (its confidence becomes 1);
- ``{"op": "remove", "person": P, "part": ..., "index": I}`` makes the point missing (0, 0, 0);
- ``{"op": "translate", "person": P, "dx": DX, "dy": DY}`` moves every present point of a person;
  with ``"part"`` it moves that part only (a hand, the face);
- ``{"op": "mirror", "person": P}`` swaps the person's left and right points (body, hands): labels
  swap, positions stay;
- ``{"op": "set_part", "person": P, "part": ..., "points": [[X, Y] or null, ...]}`` gives a part all its
  points at once (null = missing): how the editor adds a hand at a wrist. A body has 18 points, a
  hand 21, a face 70 or 68;
- ``{"op": "remove_part", "person": P, "part": ...}`` deletes a hand or the face (the part becomes
  null); on the body it makes every body point missing.

Indices count from 0 in the part as the pose has it: a DWPose face has points 0 to 67.

An empty text means no edits. Unknown operations or fields, bad indices, non-finite numbers, more
than 10,000 operations or more than 1 MB of text are refused with a ``PoseError`` (a ValueError).
"""

from __future__ import annotations

import numpy as np

from .openpose import (COUNTS, MAX_COORDINATE, MAX_PEOPLE, MAX_TEXT, PARTS, Frame, PoseError, finite, parse_text,
                       present)

MAX_OPERATIONS = 10_000
# OpenPose 18 left/right pairs: shoulders, elbows, wrists, hips, knees, ankles, eyes, ears.
BODY_MIRROR = [(2, 5), (3, 6), (4, 7), (8, 11), (9, 12), (10, 13), (14, 15), (16, 17)]
FIELDS = {"set": {"op", "person", "part", "index", "x", "y"}, "remove": {"op", "person", "part", "index"},
          "translate": {"op", "person", "dx", "dy"}, "mirror": {"op", "person"},
          "set_part": {"op", "person", "part", "points"}, "remove_part": {"op", "person", "part"}}
OPTIONAL = {"translate": {"part"}}


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
        extra = set(op) - FIELDS[op["op"]] - OPTIONAL.get(op["op"], set())
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
        if "points" in op:
            _check_points(op["points"], COUNTS[op["part"]], where)
    return ops


def _check_points(points, counts: tuple[int, ...], where: str) -> None:
    if not isinstance(points, list) or len(points) not in counts:
        got = f"{len(points)} entries" if isinstance(points, list) else _shown(points)
        raise PoseError(f"{where}: points must be a list of {' or '.join(map(str, counts))} entries "
                        f"([x, y] or null), got {got}")
    for i, point in enumerate(points):
        if point is None:
            continue
        if not (isinstance(point, list) and len(point) == 2 and all(finite(v) for v in point)):
            raise PoseError(f"{where}: point {i} must be [x, y] in pixels within +-{MAX_COORDINATE:g} or null, "
                            f"got {_shown(point)}")


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
            current = person.part(op["part"])
            count = PARTS[op["part"]][1] if current is None else len(current)
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
            if "part" not in op:
                person.move(1.0, 1.0, op["dx"], op["dy"])
            elif person.part(op["part"]) is not None:
                points = person.part(op["part"])
                keep = present(points)
                points[keep, 0] += op["dx"]
                points[keep, 1] += op["dy"]
        elif kind == "set_part":
            points = np.zeros((len(op["points"]), 3))
            for i, point in enumerate(op["points"]):
                if point is not None:
                    points[i] = (point[0], point[1], 1.0)
            setattr(person, op["part"], points)
        elif kind == "remove_part":
            setattr(person, op["part"], np.zeros((18, 3)) if op["part"] == "body" else None)
        else:
            for a, b in BODY_MIRROR:
                person.body[[a, b]] = person.body[[b, a]]
            person.hand_left, person.hand_right = person.hand_right, person.hand_left
    return out
