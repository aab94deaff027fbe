"""Place body keypoints that a crop cut off, from the visible ones, with average human proportions.

Lengths are in units of the torso T (neck to the middle of the hips), measured on the person
when possible, else estimated from the shoulders (width about 0.5 T) or the head (nose to neck
about 0.3 T). A missing point is placed only when the place it would have lies outside the
original image (the crop cut it off); a point missing inside the image was occluded or not
detected and stays missing. Every placed point is kept inside the canvas.
"""

from __future__ import annotations

import numpy as np

from .openpose import Frame, Person, present

# Body indices (OpenPose 18).
NOSE, NECK, R_SHOULDER, R_ELBOW, R_WRIST, L_SHOULDER, L_ELBOW, L_WRIST = range(8)
R_HIP, R_KNEE, R_ANKLE, L_HIP, L_KNEE, L_ANKLE, R_EYE, L_EYE, R_EAR, L_EAR = range(8, 18)

SHOULDER_HALF_WIDTH = 0.25   # neck to shoulder
HIP_HALF_WIDTH = 0.12        # middle of the hips to a hip
UPPER_ARM, FOREARM = 0.36, 0.30
THIGH, SHIN = 0.50, 0.48
HEAD = 0.30                  # neck to nose
# (point, parent, grandparent, length, default direction in the (down, side) frame, side sign)
CHAINS = [
    (R_ELBOW, R_SHOULDER, NECK, UPPER_ARM, (1.0, 0.15), 1), (R_WRIST, R_ELBOW, R_SHOULDER, FOREARM, (1.0, 0.05), 1),
    (L_ELBOW, L_SHOULDER, NECK, UPPER_ARM, (1.0, 0.15), -1), (L_WRIST, L_ELBOW, L_SHOULDER, FOREARM, (1.0, 0.05), -1),
    (R_KNEE, R_HIP, None, THIGH, (1.0, 0.0), 1), (R_ANKLE, R_KNEE, R_HIP, SHIN, (1.0, 0.0), 1),
    (L_KNEE, L_HIP, None, THIGH, (1.0, 0.0), -1), (L_ANKLE, L_KNEE, L_HIP, SHIN, (1.0, 0.0), -1),
]


def _unit(v: np.ndarray) -> np.ndarray | None:
    n = float(np.hypot(*v))
    return v / n if n > 1e-6 else None


class _Body:
    def __init__(self, body: np.ndarray):
        self.p = body
        self.ok = present(body)

    def at(self, i):
        return self.p[i, :2] if self.ok[i] else None

    def mid_hip(self):
        hips = [self.at(i) for i in (R_HIP, L_HIP) if self.ok[i]]
        return np.mean(hips, axis=0) if len(hips) == 2 else None


def _frame_axes(b: _Body) -> tuple[np.ndarray, np.ndarray, float | None]:
    """Unit 'down' (neck to hips) and 'side' (toward the person's right) vectors, and T if measurable."""
    neck, mid_hip = b.at(NECK), b.mid_hip()
    torso = None
    down = np.array([0.0, 1.0])
    if neck is not None and mid_hip is not None and _unit(mid_hip - neck) is not None:
        torso = float(np.hypot(*(mid_hip - neck)))
        down = _unit(mid_hip - neck)
    side = np.array([-down[1], down[0]])  # facing the camera, the person's right is at the image's left
    if b.ok[R_SHOULDER] and b.ok[L_SHOULDER]:
        across = _unit(b.at(R_SHOULDER) - b.at(L_SHOULDER))
        if across is not None and float(across @ side) < 0:
            side = -side
    elif neck is not None and (b.ok[R_SHOULDER] or b.ok[L_SHOULDER]):
        i, sign = (R_SHOULDER, 1) if b.ok[R_SHOULDER] else (L_SHOULDER, -1)
        across = _unit(b.at(i) - neck)
        if across is not None and sign * float(across @ side) < 0:
            side = -side
    return down, side, torso


def _torso_length(b: _Body, measured: float | None) -> float | None:
    if measured:
        return measured
    if b.ok[R_SHOULDER] and b.ok[L_SHOULDER]:
        return float(np.hypot(*(b.at(R_SHOULDER) - b.at(L_SHOULDER)))) / (2 * SHOULDER_HALF_WIDTH)
    for a, c, ratio in ((NECK, R_SHOULDER, SHOULDER_HALF_WIDTH), (NECK, L_SHOULDER, SHOULDER_HALF_WIDTH),
                        (NOSE, NECK, HEAD)):
        if b.ok[a] and b.ok[c]:
            return float(np.hypot(*(b.at(a) - b.at(c)))) / ratio
    return None


def complete_person(person: Person, visible: tuple[float, float, float, float], width: int, height: int) -> Person:
    """A copy of ``person`` with the body points the crop cut off placed; ``visible`` is the original
    image's box (x0, y0, x1, y1) on the canvas of ``width x height``."""
    out = person.copy()
    b = _Body(out.body)
    down, side, measured = _frame_axes(b)
    torso = _torso_length(b, measured)
    if torso is None or torso < 1:
        return out
    x0, y0, x1, y1 = visible

    def place(i: int, where: np.ndarray) -> None:
        if b.ok[i]:
            return
        inside_image = x0 <= where[0] < x1 and y0 <= where[1] < y1
        if inside_image:
            return  # occluded or undetected, not cut off
        out.body[i] = (np.clip(where[0], 0, width - 1), np.clip(where[1], 0, height - 1), 1.0)
        b.ok[i] = True

    neck = b.at(NECK)
    if neck is None and b.ok[R_SHOULDER] and b.ok[L_SHOULDER]:
        place(NECK, (b.at(R_SHOULDER) + b.at(L_SHOULDER)) / 2)
        neck = b.at(NECK)
    if neck is None:
        return out
    for i, sign in ((R_SHOULDER, 1), (L_SHOULDER, -1)):
        place(i, neck + sign * SHOULDER_HALF_WIDTH * torso * side)
    mid_hip = b.mid_hip()
    if mid_hip is None:
        known = [(i, s) for i, s in ((R_HIP, 1), (L_HIP, -1)) if b.ok[i]]
        mid_hip = (b.at(known[0][0]) - known[0][1] * HIP_HALF_WIDTH * torso * side) if known \
            else neck + torso * down
    for i, sign in ((R_HIP, 1), (L_HIP, -1)):
        place(i, mid_hip + sign * HIP_HALF_WIDTH * torso * side)
    for point, parent, grandparent, length, (d, s), sign in CHAINS:
        if not b.ok[parent]:
            continue
        direction = None
        if grandparent is not None and b.ok[grandparent] and grandparent != NECK:
            direction = _unit(b.at(parent) - b.at(grandparent))  # continue the limb straight on
        if direction is None:
            direction = _unit(d * down + sign * s * side)
        place(point, b.at(parent) + length * torso * direction)
    place(NOSE, neck - HEAD * torso * down)
    if b.ok[NOSE]:
        nose = b.at(NOSE)
        for i, sign, across, up in ((R_EYE, 1, 0.07, 0.05), (L_EYE, -1, 0.07, 0.05),
                                    (R_EAR, 1, 0.15, 0.0), (L_EAR, -1, 0.15, 0.0)):
            place(i, nose + sign * across * torso * side - up * torso * down)
    return out


def complete(frame: Frame, visible: tuple[float, float, float, float]) -> Frame:
    """``complete_person`` for every person of the frame."""
    return Frame(frame.width, frame.height,
                 [complete_person(p, visible, frame.width, frame.height) for p in frame.people])
