"""The OpenPose keypoint format that comfyui_controlnet_aux passes as POSE_KEYPOINT, read and written.

A POSE_KEYPOINT is a list of frames ``{"people": [...], "canvas_width": W, "canvas_height": H}``;
each person has flat ``[x, y, confidence, ...]`` arrays ``pose_keypoints_2d`` (18 points),
``face_keypoints_2d`` (70 from OpenPose: 68 landmarks and the two pupils; 68 from DWPose),
``hand_left_keypoints_2d`` and ``hand_right_keypoints_2d`` (21 each). A missing point is ``0, 0, 0``;
a missing part is ``null``. A face is read, edited and written with the number of points it came with.

Units differ by producer: its OpenPose detector writes coordinates normalised to 0-1, DWPose
writes pixels. We read both (a frame whose present coordinates all lie in [0, 1] is normalised)
and WRITE PIXELS of the frame's canvas, always.

Its OpenPose detector also marks undetected hand and face points as ``-1/W, -1/H`` with
confidence 1 (its renderer skips them); we read any point with a negative coordinate as missing
and write it as ``0, 0, 0``. Every other point is written exactly as it was read.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field

import numpy as np

PARTS = {"body": ("pose_keypoints_2d", 18), "face": ("face_keypoints_2d", 70),
         "hand_left": ("hand_left_keypoints_2d", 21), "hand_right": ("hand_right_keypoints_2d", 21)}
# Point counts a part may have: the first is the part's own (OpenPose's), used for a part created by an edit.
COUNTS = {"body": (18,), "face": (70, 68), "hand_left": (21,), "hand_right": (21,)}
MAX_TEXT = 1_000_000  # characters of JSON text
MAX_FRAMES = 256
MAX_PEOPLE = 64
MAX_CANVAS = 16384
MAX_COORDINATE = 1e6
MAX_DEPTH = 8  # a POSE_KEYPOINT nests 5 levels, an edit list 2
MAX_DIGITS = 20  # digits of an integer literal


@dataclass
class Person:
    """Keypoints in pixels: ``(n, 3)`` arrays of x, y, confidence (0 = missing); a missing part is None."""
    body: np.ndarray = field(default_factory=lambda: np.zeros((18, 3)))
    face: np.ndarray | None = None
    hand_left: np.ndarray | None = None
    hand_right: np.ndarray | None = None

    def part(self, name: str) -> np.ndarray | None:
        return getattr(self, name)

    def copy(self) -> "Person":
        return Person(*(None if p is None else p.copy() for p in (self.body, self.face, self.hand_left,
                                                                   self.hand_right)))

    def parts(self) -> list[np.ndarray]:
        """The keypoint arrays this person has (the body always; face and hands when given)."""
        return [p for p in (self.body, self.face, self.hand_left, self.hand_right) if p is not None]

    def move(self, sx: float, sy: float, dx: float, dy: float) -> None:
        """Scale by (sx, sy), then shift by (dx, dy), every present point, in place."""
        for points in self.parts():
            keep = present(points)
            points[keep, 0] = points[keep, 0] * sx + dx
            points[keep, 1] = points[keep, 1] * sy + dy


@dataclass
class Frame:
    width: int
    height: int
    people: list[Person] = field(default_factory=list)

    def copy(self) -> "Frame":
        return Frame(self.width, self.height, [p.copy() for p in self.people])


def present(points: np.ndarray) -> np.ndarray:
    """Which rows of an ``(n, 3)`` array are present points."""
    return points[:, 2] > 0


class PoseError(ValueError):
    """A pose that cannot be read; the message says what is wrong with it."""


def parse_text(text: str) -> list:
    """JSON text of a POSE_KEYPOINT (or an edit list), refused when too long, too deeply nested or
    holding integers too long to be coordinates; all checks run before or inside one linear parse."""
    if not isinstance(text, str):
        raise PoseError(f"expected JSON text, got {type(text).__name__}")
    if len(text) > MAX_TEXT or len(text.encode("utf-8", "surrogatepass")) > MAX_TEXT:
        raise PoseError(f"the JSON text has {len(text):,} characters; at most {MAX_TEXT:,} bytes are accepted")
    depth = 0
    for ch in text:  # bound nesting before the parser recurses
        if ch in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise PoseError(f"the JSON is nested deeper than a pose (more than {MAX_DEPTH} levels)")
        elif ch in "]}":
            depth -= 1
    try:
        return json.loads(text, parse_constant=_no_constant, parse_int=_int)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        if isinstance(e, PoseError):
            raise
        raise PoseError(f"it is not valid JSON: {e}") from None


def _int(literal: str) -> int:
    if len(literal.lstrip("-")) > MAX_DIGITS:
        raise PoseError(f"the integer {literal[:12]}... has {len(literal):,} digits; it is not a coordinate")
    return int(literal)


def is_number(value) -> bool:
    """A real number that is not a bool (numpy scalars included)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def finite(value, bound: float = MAX_COORDINATE) -> bool:
    """A number within +-``bound`` (no NaN, no infinity; checked without converting huge ints)."""
    if not is_number(value):
        return False
    if isinstance(value, numbers.Integral):
        return -bound <= value <= bound
    value = float(value)
    return math.isfinite(value) and abs(value) <= bound


def _no_constant(name: str):
    raise PoseError(f"{name} is not a coordinate")


def _points(value, counts: int | tuple[int, ...], where: str) -> np.ndarray | None:
    if value is None:
        return None
    counts = (counts,) if isinstance(counts, int) else counts
    if not isinstance(value, (list, tuple)) or len(value) not in [3 * n for n in counts]:
        got = f"{len(value)} numbers" if isinstance(value, (list, tuple)) else type(value).__name__
        wanted = f"{3 * counts[0]} numbers ({counts[0]} points of x, y, confidence)" + "".join(
            f" or {3 * n} numbers ({n} points)" for n in counts[1:])
        raise PoseError(f"{where} must be a list of {wanted}, or null, got {got}")
    count = len(value) // 3
    if not all(is_number(v) for v in value):
        raise PoseError(f"{where} holds something that is not a number")
    if not all(finite(v) for v in value):
        raise PoseError(f"{where} holds a NaN, an infinity or a number beyond {MAX_COORDINATE:g}")
    points = np.asarray([float(v) for v in value], dtype=np.float64).reshape(count, 3)
    # missing: no confidence, or controlnet_aux's -1 marker for an undetected hand or face point
    missing = (points[:, 2] <= 0) | (points[:, 0] < 0) | (points[:, 1] < 0)
    points[missing] = 0.0
    return points


def _size(frame: dict, key: str, where: str) -> int:
    value = frame.get(key)
    if not finite(value, MAX_CANVAS) or not 1 <= value <= MAX_CANVAS or value != int(value):
        shown = repr(value) if len(repr(value)) < 40 else repr(value)[:40] + "..."
        raise PoseError(f"{where}.{key} must be a whole number of pixels from 1 to {MAX_CANVAS}, got {shown}")
    return int(value)


def from_pose_keypoint(data) -> list[Frame]:
    """Frames from a POSE_KEYPOINT (a list of frame dicts, a single frame dict, or JSON text of either)."""
    if isinstance(data, str):
        data = parse_text(data)
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not data:
        raise PoseError("a POSE_KEYPOINT is a non-empty list of frames")
    if len(data) > MAX_FRAMES:
        raise PoseError(f"{len(data)} frames; at most {MAX_FRAMES}")
    frames = []
    for f, frame in enumerate(data):
        where = f"frame {f}"
        if not isinstance(frame, dict):
            raise PoseError(f"{where} is not an object")
        width, height = _size(frame, "canvas_width", where), _size(frame, "canvas_height", where)
        people = frame.get("people")
        people = [] if people is None else people
        if not isinstance(people, list) or len(people) > MAX_PEOPLE:
            raise PoseError(f"{where}.people must be a list of at most {MAX_PEOPLE} people")
        out = Frame(width, height)
        for p, person in enumerate(people):
            if not isinstance(person, dict):
                raise PoseError(f"{where}.people[{p}] is not an object")
            parts = {name: _points(person.get(key), COUNTS[name], f"{where}.people[{p}].{key}")
                     for name, (key, _) in PARTS.items()}
            if parts["body"] is None:
                parts["body"] = np.zeros((18, 3))
            out.people.append(Person(**parts))
        _to_pixels(out)
        frames.append(out)
    return frames


def _to_pixels(frame: Frame) -> None:
    """Scale a normalised frame (every present coordinate within [0, 1]) to pixels, in place."""
    parts = [p for person in frame.people for p in person.parts()]
    coords = np.concatenate([p[present(p), :2] for p in parts]) if parts else np.zeros((0, 2))
    if coords.size == 0 or coords.max() > 1.0 or coords.min() < 0.0:
        return
    for person in frame.people:
        person.move(frame.width, frame.height, 0.0, 0.0)


def to_pose_keypoint(frames: list[Frame], normalised: bool = False) -> list[dict]:
    """The POSE_KEYPOINT of ``frames``: pixels (our convention), or 0-1 when ``normalised``."""
    out = []
    for frame in frames:
        people = []
        for person in frame.people:
            entry = {}
            for name, (key, _) in PARTS.items():
                points = person.part(name)
                if points is None:
                    entry[key] = None
                    continue
                points = points.copy()
                if normalised:
                    points[:, 0] /= frame.width
                    points[:, 1] /= frame.height
                points[~present(points)] = 0.0
                entry[key] = [float(v) for v in points.reshape(-1)]
            people.append(entry)
        out.append({"people": people, "canvas_width": frame.width, "canvas_height": frame.height})
    return out


def place(frame: Frame, width: int, height: int, scale: tuple[float, float] = (1.0, 1.0),
          offset: tuple[float, float] = (0.0, 0.0)) -> Frame:
    """The frame on a canvas of ``width x height``, every present point scaled by ``scale`` and then
    shifted by ``offset`` (pixels)."""
    out = frame.copy()
    out.width, out.height = width, height
    for person in out.people:
        person.move(*scale, *offset)
    return out
