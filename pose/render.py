"""Draw OpenPose skeletons as ControlNet openpose models were trained on them.

The drawing is controlnet_aux's (``draw_bodypose``/``draw_handpose``/``draw_facepose``, the ControlNet
annotator), with the same OpenCV calls: 17 limbs as filled ``ellipse2Poly`` polygons in 60 % of their
colour, 18 joints as ``cv2.circle`` discs in full colour, hand bones as ``cv2.line`` in a hue wheel with
blue joints, face points as white discs, every point of the face it was given (68 from DWPose, 70 from
OpenPose, whose last two are the pupils). People are drawn in order, each body, hands, then face, as
its ``draw_poses`` does.

Sizes are those of the annotator's 512 px canvas (stick half-width 4, joint radius 4, hand line 2,
hand joint 4, face dot 3), scaled with the canvas's shorter side (fractional sizes drawn to the
sixteenth of a pixel, hand lines rounded to whole pixels); on a canvas whose shorter side is 512 the
image is the annotator's, pixel for pixel.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

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
# The annotator's sizes in pixels of a 512 px canvas.
STICK_HALF_WIDTH, JOINT_RADIUS, HAND_LINE, HAND_JOINT_RADIUS, FACE_RADIUS = 4, 4, 2, 4, 3
ANNOTATOR_SIZE = 512
HAND_LINE_DRAWN = 3  # pixels across the annotator's thickness-2 hand line


def limb_color(index: int) -> tuple[int, int, int]:
    """The fill of limb ``index``: its colour at 60 %."""
    return tuple(int(c * 0.6) for c in COLORS[index])


def sizes(width: int, height: int) -> dict[str, float]:
    """Stroke sizes in pixels for a ``width x height`` canvas: the annotator's, scaled with the shorter
    side over 512 (every size at least 1). A hand line is a ``cv2.line`` thickness: OpenCV draws
    thickness 1 one pixel wide, 2 three pixels, and 2k - 1 or 2k (k > 1) 2k + 1 pixels, so the thickness
    is the one whose drawn width is nearest the annotator's 3 px times the scale."""
    scale = min(width, height) / ANNOTATOR_SIZE
    out = {name: max(1.0, value * scale) for name, value in (
        ("stick", STICK_HALF_WIDTH), ("joint", JOINT_RADIUS), ("hand_joint", HAND_JOINT_RADIUS),
        ("face", FACE_RADIUS))}
    k = max(0, round((HAND_LINE_DRAWN * scale - 1) / 2))  # drawn width 2k + 1
    out["hand_line"] = 1 if k == 0 else 2 if k == 1 else 2 * k - 1
    return out


def _disc(canvas, x: float, y: float, radius: float, color) -> None:
    """The pixels within ``radius`` of the pixel (int(x), int(y)): what ``cv2.circle(..., thickness=-1)``
    fills for a whole radius (checked for radii 1 to 24), and the same rule for a fractional one."""
    cx, cy, reach = int(x), int(y), int(radius)
    height, width = canvas.shape[:2]
    x0, x1, y0, y1 = max(0, cx - reach), min(width, cx + reach + 1), max(0, cy - reach), min(height, cy + reach + 1)
    if x0 >= x1 or y0 >= y1:
        return
    yy, xx = np.ogrid[y0:y1, x0:x1]
    inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius * radius + 1e-9
    canvas[y0:y1, x0:x1][inside] = color


SUBPIXEL_BITS = 4


def _limb(canvas, a, b, half_width: float, color) -> None:
    """As draw_bodypose: an ellipse polygon on the limb's midpoint, truncated to whole pixels and degrees;
    a fractional half-width is drawn in 1/16 pixel (OpenCV's fixed point)."""
    (x1, y1), (x2, y2) = a, b
    length = math.hypot(x1 - x2, y1 - y2)
    angle = int(math.degrees(math.atan2(y1 - y2, x1 - x2)))
    center = (int((x1 + x2) / 2), int((y1 + y2) / 2))
    if half_width == int(half_width):
        polygon = cv2.ellipse2Poly(center, (int(length / 2), int(half_width)), angle, 0, 360, 1)
        cv2.fillConvexPoly(canvas, polygon, color)
        return
    k = 1 << SUBPIXEL_BITS
    polygon = cv2.ellipse2Poly((center[0] * k, center[1] * k), (int(length / 2) * k, round(half_width * k)),
                               angle, 0, 360, 1)
    cv2.fillConvexPoly(canvas, polygon, color, shift=SUBPIXEL_BITS)


def _drawn(x: float, y: float) -> bool:
    # draw_handpose and draw_facepose skip a point on the canvas's first row or column (their "eps" test)
    return int(x) > 0 and int(y) > 0


def render(frame: Frame, width: int | None = None, height: int | None = None) -> np.ndarray:
    """An ``(height, width, 3)`` uint8 RGB image of every person in ``frame`` on black (pixels of its canvas)."""
    width, height = width or frame.width, height or frame.height
    sx, sy = width / frame.width, height / frame.height
    size = sizes(width, height)
    canvas = np.zeros((height, width, 3), np.uint8)
    for person in frame.people:
        body = person.body[:, :2] * (sx, sy)
        ok = present(person.body)
        for i, (a, b) in enumerate(LIMBS):
            if ok[a] and ok[b]:
                _limb(canvas, body[a], body[b], size["stick"], limb_color(i))
        for i in np.flatnonzero(ok):
            _disc(canvas, body[i, 0], body[i, 1], size["joint"], COLORS[i])
        for hand in (person.hand_left, person.hand_right):
            if hand is None:
                continue
            points, hok = hand[:, :2] * (sx, sy), present(hand)
            for i, (a, b) in enumerate(HAND_BONES):
                (x1, y1), (x2, y2) = points[a], points[b]
                if hok[a] and hok[b] and _drawn(x1, y1) and _drawn(x2, y2):
                    cv2.line(canvas, (int(x1), int(y1)), (int(x2), int(y2)), HAND_COLORS[i],
                             thickness=size["hand_line"])
            for i in np.flatnonzero(hok):
                if _drawn(*points[i]):
                    _disc(canvas, points[i, 0], points[i, 1], size["hand_joint"], (0, 0, 255))
        if person.face is not None:
            points = person.face[:, :2] * (sx, sy)
            for i in np.flatnonzero(present(person.face)):
                if _drawn(*points[i]):
                    _disc(canvas, points[i, 0], points[i, 1], size["face"], (255, 255, 255))
    return canvas
