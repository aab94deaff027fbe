"""Draw OpenPose skeletons as ControlNet openpose models were trained on them.

The colour map, limb order and styles are the standard OpenPose ones (as in controlnet_aux's
``draw_bodypose``/``draw_handpose``/``draw_facepose``): 17 limbs as filled ellipses in 60 % of
their colour, 18 joints as dots in full colour, hand bones in a hue wheel with blue joints, face
points white. Sizes are those of a 512 px canvas, scaled with the canvas's shorter side.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from .openpose import Frame, present

# OpenPose 18-point body: 0 nose, 1 neck, 2-4 right arm, 5-7 left arm, 8-10 right leg, 11-13 left leg,
# 14/15 right/left eye, 16/17 right/left ear. Limbs as (from, to), in drawing order.
LIMBS = [(1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
         (1, 0), (0, 14), (14, 16), (0, 15), (15, 17)]
COLORS = [(255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
          (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
          (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85)]
HAND_BONES = [(0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10), (10, 11), (11, 12),
              (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20)]
# Hand bone i has hue i/20 at full saturation and value, rounded as OpenCV rounds a float colour
# (half to even, so 76.5 -> 76 but 127.5 -> 128): the exact pixels controlnet_aux's draw_handpose writes.
HAND_COLORS = [(255, 0, 0), (255, 77, 0), (255, 153, 0), (255, 229, 0), (204, 255, 0), (128, 255, 0), (51, 255, 0),
               (0, 255, 25), (0, 255, 102), (0, 255, 179), (0, 255, 255), (0, 178, 255), (0, 102, 255), (0, 25, 255),
               (51, 0, 255), (128, 0, 255), (204, 0, 255), (255, 0, 230), (255, 0, 153), (255, 0, 77)]


def limb_color(index: int) -> tuple[int, int, int]:
    """The fill of limb ``index``: its colour at 60 %."""
    return tuple(int(c * 0.6) for c in COLORS[index])


def _ellipse(draw, a, b, half_width, color):
    (x1, y1), (x2, y2) = a, b
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    half_length = math.hypot(x2 - x1, y2 - y1) / 2
    angle = math.atan2(y2 - y1, x2 - x1)
    ca, sa = math.cos(angle), math.sin(angle)
    points = []
    for k in range(72):
        t = 2 * math.pi * k / 72
        ex, ey = half_length * math.cos(t), half_width * math.sin(t)
        points.append((cx + ex * ca - ey * sa, cy + ex * sa + ey * ca))
    draw.polygon(points, fill=color)


def _dot(draw, x, y, radius, color):
    draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=color)


def render(frame: Frame, width: int | None = None, height: int | None = None) -> np.ndarray:
    """An ``(height, width, 3)`` uint8 image of every person in ``frame`` on black (pixels of its canvas)."""
    width, height = width or frame.width, height or frame.height
    sx, sy = width / frame.width, height / frame.height
    scale = min(width, height) / 512
    stick, joint, hand_line, hand_joint, face_dot = (max(1.0, v * scale) for v in (4, 4, 2, 4, 3))
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    for person in frame.people:
        body = person.body
        ok = present(body)
        for i, (a, b) in enumerate(LIMBS):
            if ok[a] and ok[b]:
                _ellipse(draw, (body[a, 0] * sx, body[a, 1] * sy), (body[b, 0] * sx, body[b, 1] * sy), stick,
                         limb_color(i))
        for i in np.flatnonzero(ok):
            _dot(draw, body[i, 0] * sx, body[i, 1] * sy, joint, COLORS[i])
        for hand in (person.hand_left, person.hand_right):
            if hand is None:
                continue
            hok = present(hand)
            for i, (a, b) in enumerate(HAND_BONES):
                if hok[a] and hok[b]:
                    draw.line([(hand[a, 0] * sx, hand[a, 1] * sy), (hand[b, 0] * sx, hand[b, 1] * sy)],
                              fill=HAND_COLORS[i], width=max(1, round(hand_line)))
            for i in np.flatnonzero(hok):
                _dot(draw, hand[i, 0] * sx, hand[i, 1] * sy, hand_joint, (0, 0, 255))
        if person.face is not None:
            for i in np.flatnonzero(present(person.face)):
                _dot(draw, person.face[i, 0] * sx, person.face[i, 1] * sy, face_dot, (255, 255, 255))
    return np.asarray(image)
