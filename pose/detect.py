"""OpenPose detection through controlnet_aux, converted to our keypoints (pixels).

The detector is controlnet_aux's ``OpenposeDetector.from_pretrained`` on a folder that holds the
lllyasviel/Annotators files ``body_pose_model.pth``, ``hand_pose_model.pth`` and ``facenet.pth``
(or, when the folder lacks them, the hub repository, downloaded as controlnet_aux does).
"""

from __future__ import annotations

import os

import numpy as np

from .openpose import Frame, Person

WEIGHTS = ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth")
HUB_REPOSITORY = "lllyasviel/Annotators"


def load_detector(folder: str, allow_download: bool = True):
    """controlnet_aux's OpenposeDetector from ``folder`` (or the hub, cached in ``folder``)."""
    from controlnet_aux.open_pose import OpenposeDetector

    if all(os.path.isfile(os.path.join(folder, name)) for name in WEIGHTS):
        return OpenposeDetector.from_pretrained(folder)
    if not allow_download:
        missing = [n for n in WEIGHTS if not os.path.isfile(os.path.join(folder, n))]
        raise FileNotFoundError(f"{folder} lacks {missing}")
    return OpenposeDetector.from_pretrained(HUB_REPOSITORY, cache_dir=folder)


def _points(keypoints, count: int, width: int, height: int) -> np.ndarray | None:
    if keypoints is None:
        return None
    out = np.zeros((count, 3))
    for i, k in enumerate(keypoints[:count]):
        if k is not None and k.x >= 0 and k.y >= 0:  # controlnet_aux marks missing hand/face points with -1
            out[i] = (k.x * width, k.y * height, max(float(getattr(k, "score", 1.0)), 1e-3))
    return out


def frame_from_results(results, width: int, height: int) -> Frame:
    """Our Frame from ``OpenposeDetector.detect_poses`` results (coordinates normalised to 0-1)."""
    frame = Frame(width, height)
    for pose in results:
        frame.people.append(Person(_points(pose.body.keypoints, 18, width, height),
                                   _points(pose.face, 70, width, height),
                                   _points(pose.left_hand, 21, width, height),
                                   _points(pose.right_hand, 21, width, height)))
    return frame


def detect(detector, image: np.ndarray, hands: bool = True, face: bool = True) -> Frame:
    """Detect the people of an ``(H, W, 3)`` uint8 RGB image."""
    height, width = image.shape[:2]
    results = detector.detect_poses(np.ascontiguousarray(image), include_hand=hands, include_face=face)
    return frame_from_results(results, width, height)
