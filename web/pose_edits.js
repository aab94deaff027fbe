// The keypoint edits of PoseEditOutpaint's `edits` widget, applied in the browser for display.
// Same format and meaning as the backend's pose/edits.py: a JSON list of operations in pixels
// of the padded canvas ("set", "remove", "translate", "mirror", "set_part", "remove_part"). No DOM here.

// Points of a part as created by an edit; a face read from a pose may also have 68 (DWPose).
export const PARTS = { body: 18, face: 70, hand_left: 21, hand_right: 21 };
export const COUNTS = { body: [18], face: [70, 68], hand_left: [21], hand_right: [21] };
export const OPS = ["set", "remove", "translate", "mirror", "set_part", "remove_part"];
const KEYS = {
  body: "pose_keypoints_2d",
  face: "face_keypoints_2d",
  hand_left: "hand_left_keypoints_2d",
  hand_right: "hand_right_keypoints_2d",
};

export const BODY_NAMES = [
  "nose", "neck", "right shoulder", "right elbow", "right wrist", "left shoulder", "left elbow",
  "left wrist", "right hip", "right knee", "right ankle", "left hip", "left knee", "left ankle",
  "right eye", "left eye", "right ear", "left ear",
];
// OpenPose 18 limbs (from, to) and colours, in the order the ControlNet renderer uses.
export const LIMBS = [
  [1, 2], [1, 5], [2, 3], [3, 4], [5, 6], [6, 7], [1, 8], [8, 9], [9, 10], [1, 11], [11, 12],
  [12, 13], [1, 0], [0, 14], [14, 16], [0, 15], [15, 17],
];
export const COLORS = [
  [255, 0, 0], [255, 85, 0], [255, 170, 0], [255, 255, 0], [170, 255, 0], [85, 255, 0], [0, 255, 0],
  [0, 255, 85], [0, 255, 170], [0, 255, 255], [0, 170, 255], [0, 85, 255], [0, 0, 255], [85, 0, 255],
  [170, 0, 255], [255, 0, 255], [255, 0, 170], [255, 0, 85],
];
export const HAND_BONES = [
  [0, 1], [1, 2], [2, 3], [3, 4], [0, 5], [5, 6], [6, 7], [7, 8], [0, 9], [9, 10], [10, 11],
  [11, 12], [0, 13], [13, 14], [14, 15], [15, 16], [0, 17], [17, 18], [18, 19], [19, 20],
];
// Hand bone i in hue i / 20, as OpenCV writes controlnet_aux's draw_handpose colours (pose/render.py).
export const HAND_COLORS = [
  [255, 0, 0], [255, 77, 0], [255, 153, 0], [255, 229, 0], [204, 255, 0], [128, 255, 0], [51, 255, 0],
  [0, 255, 25], [0, 255, 102], [0, 255, 179], [0, 255, 255], [0, 178, 255], [0, 102, 255], [0, 25, 255],
  [51, 0, 255], [128, 0, 255], [204, 0, 255], [255, 0, 230], [255, 0, 153], [255, 0, 77],
];
export const R_WRIST = 4;
export const L_WRIST = 7;
const R_ELBOW = 3;
const L_ELBOW = 6;
const NECK = 1;
// Left/right body pairs that "mirror" swaps: shoulders, elbows, wrists, hips, knees, ankles, eyes, ears.
export const BODY_MIRROR = [[2, 5], [3, 6], [4, 7], [8, 11], [9, 12], [10, 13], [14, 15], [16, 17]];

export const MAX_OPERATIONS = 10000;

/** A readable name for a point, e.g. "left knee" or "right hand 4". */
export function pointName(part, index) {
  if (part === "body") return BODY_NAMES[index] ?? `body ${index}`;
  if (part === "face") return `face ${index}`;
  if (index === undefined) return `${part === "hand_left" ? "left" : "right"} hand`;
  return `${part === "hand_left" ? "left" : "right"} hand ${index}`;
}

/** Frame 0 of a POSE_KEYPOINT (JSON text or parsed) as {width, height, people: [{body, face, ...}]},
 * each part an array of [x, y, c] or null. */
export function readFrame(poseKeypoint) {
  const data = typeof poseKeypoint === "string" ? JSON.parse(poseKeypoint) : poseKeypoint;
  const frame = Array.isArray(data) ? data[0] : data;
  if (!frame || !(frame.canvas_width > 0) || !(frame.canvas_height > 0)) {
    throw new Error("the pose has no canvas size");
  }
  const people = (frame.people ?? []).map((person) => {
    const out = {};
    for (const [part, count] of Object.entries(PARTS)) {
      const flat = person[KEYS[part]];
      if (!Array.isArray(flat) || !COUNTS[part].includes(flat.length / 3)) {
        out[part] = part === "body" ? emptyPart(count) : null;
        continue;
      }
      out[part] = [];
      for (let i = 0; i < flat.length / 3; i++) {
        const c = flat[3 * i + 2];
        out[part].push(c > 0 ? [flat[3 * i], flat[3 * i + 1], c] : [0, 0, 0]);
      }
    }
    return out;
  });
  return { width: frame.canvas_width, height: frame.canvas_height, people };
}

function emptyPart(count) {
  return Array.from({ length: count }, () => [0, 0, 0]);
}

export function isPresent(point) {
  return !!point && point[2] > 0;
}

function copyFrame(frame) {
  return {
    width: frame.width,
    height: frame.height,
    people: frame.people.map((p) => {
      const out = {};
      for (const part of Object.keys(PARTS)) out[part] = p[part] ? p[part].map((pt) => pt.slice()) : null;
      return out;
    }),
  };
}

/** The operations in the widget's text; an empty text is no edits. Throws an Error saying what is wrong. */
export function parseEdits(text) {
  if (!text || !text.trim()) return [];
  let ops;
  try {
    ops = JSON.parse(text);
  } catch (e) {
    throw new Error(`the edits are not valid JSON (${e.message})`);
  }
  if (!Array.isArray(ops)) throw new Error("the edits must be a JSON list of operations");
  if (ops.length > MAX_OPERATIONS) throw new Error(`${ops.length} operations; at most ${MAX_OPERATIONS}`);
  ops.forEach((op, n) => {
    if (!op || typeof op !== "object" || !OPS.includes(op.op)) {
      throw new Error(`operation ${n} must have "op" one of ${OPS.join(", ")}`);
    }
  });
  return ops;
}

export function formatEdits(ops) {
  return ops.length ? JSON.stringify(ops) : "";
}

/** `frame` with `ops` applied, as the backend applies them; an operation the frame cannot take
 * (a person or point that does not exist) is skipped and reported in `problems`. */
export function applyEdits(frame, ops) {
  const out = copyFrame(frame);
  const problems = [];
  ops.forEach((op, n) => {
    const person = out.people[op.person];
    if (!person) {
      problems.push(`operation ${n}: person ${op.person} does not exist`);
      return;
    }
    if (op.op === "set" || op.op === "remove") {
      const count = person[op.part]?.length ?? PARTS[op.part];
      if (!count || !(op.index >= 0 && op.index < count)) {
        problems.push(`operation ${n}: no point ${op.part} ${op.index}`);
        return;
      }
      if (!person[op.part]) {
        if (op.op === "remove") return;
        person[op.part] = emptyPart(count);
      }
      person[op.part][op.index] = op.op === "set" ? [op.x, op.y, 1] : [0, 0, 0];
    } else if (op.op === "set_part") {
      if (!COUNTS[op.part] || !Array.isArray(op.points) || !COUNTS[op.part].includes(op.points.length)) {
        problems.push(`operation ${n}: ${op.part} cannot have ${op.points?.length} points`);
        return;
      }
      person[op.part] = op.points.map((p) => (p ? [p[0], p[1], 1] : [0, 0, 0]));
    } else if (op.op === "remove_part") {
      if (!COUNTS[op.part]) {
        problems.push(`operation ${n}: no part ${op.part}`);
        return;
      }
      person[op.part] = op.part === "body" ? emptyPart(PARTS.body) : null;
    } else if (op.op === "translate") {
      for (const part of op.part ? [op.part] : Object.keys(PARTS)) {
        for (const point of person[part] ?? []) {
          if (isPresent(point)) {
            point[0] += op.dx;
            point[1] += op.dy;
          }
        }
      }
    } else if (op.op === "mirror") {
      for (const [a, b] of BODY_MIRROR) [person.body[a], person.body[b]] = [person.body[b], person.body[a]];
      [person.hand_left, person.hand_right] = [person.hand_right, person.hand_left];
    }
  });
  return { frame: out, problems };
}

/** Pixels rounded to a tenth: exact enough for a pose, short in the saved workflow. */
export function px(value) {
  return Math.round(value * 10) / 10;
}

/** `ops` with one more operation; a move of the point (or person) that the last operation already
 * moved replaces it, so nudging with the arrow keys does not grow the list. */
export function withOperation(ops, op) {
  const last = ops[ops.length - 1];
  if (last && op.op === "set" && last.op === "set" && last.person === op.person && last.part === op.part
      && last.index === op.index) {
    return [...ops.slice(0, -1), op];
  }
  if (last && op.op === "translate" && last.op === "translate" && last.person === op.person
      && last.part === op.part) {
    const sum = { op: "translate", person: op.person, ...(op.part ? { part: op.part } : {}),
      dx: px(last.dx + op.dx), dy: px(last.dy + op.dy) };
    return sum.dx === 0 && sum.dy === 0 ? ops.slice(0, -1) : [...ops.slice(0, -1), sum];
  }
  return [...ops, op];
}

/** Where to place a missing body joint: a step from a present neighbour in the skeleton (up for the
 * head, down for the rest), else the centre of the canvas. */
export function placeForMissing(frame, personIndex, index) {
  const body = frame.people[personIndex].body;
  for (const [a, b] of LIMBS) {
    const other = a === index ? b : b === index ? a : null;
    if (other !== null && isPresent(body[other])) {
      const step = Math.max(16, Math.min(frame.width, frame.height) / 10);
      const up = [0, 14, 15, 16, 17].includes(index);
      const y = Math.min(frame.height - 1, Math.max(0, body[other][1] + (up ? -step : step)));
      return [px(body[other][0]), px(y)];
    }
  }
  return [px(frame.width / 2), px(frame.height / 2)];
}

// An open hand, palm to the camera, in units of the hand's length (wrist to the middle fingertip):
// [along the forearm, across toward the thumb], OpenPose's 21 points (0 wrist, then thumb, index,
// middle, ring and little finger from base to tip).
const HAND_TEMPLATE = [
  [0, 0],
  [0.12, 0.16], [0.25, 0.3], [0.38, 0.4], [0.5, 0.48],
  [0.45, 0.17], [0.66, 0.19], [0.79, 0.2], [0.91, 0.21],
  [0.47, 0.03], [0.7, 0.03], [0.85, 0.03], [1, 0.03],
  [0.45, -0.1], [0.66, -0.12], [0.79, -0.13], [0.9, -0.14],
  [0.41, -0.22], [0.56, -0.26], [0.66, -0.28], [0.75, -0.3],
];

/** The 21 points of a default open hand at the person's wrist ("hand_left" or "hand_right"), pointing
 * on from the forearm with the thumb away from the body, 0.7 forearm long; null without the wrist. */
export function defaultHand(frame, personIndex, part) {
  const body = frame.people[personIndex].body;
  const [wristIndex, elbowIndex] = part === "hand_left" ? [L_WRIST, L_ELBOW] : [R_WRIST, R_ELBOW];
  const wrist = body[wristIndex];
  if (!isPresent(wrist)) return null;
  const elbow = body[elbowIndex];
  let along = [0, 1];
  let length = Math.max(12, Math.min(frame.width, frame.height) / 12);
  if (isPresent(elbow)) {
    const d = [wrist[0] - elbow[0], wrist[1] - elbow[1]];
    const n = Math.hypot(d[0], d[1]);
    if (n > 1) {
      along = [d[0] / n, d[1] / n];
      length = 0.7 * n;
    }
  }
  let across = [-along[1], along[0]];
  // the thumb points away from the body: from the neck (or the image's middle) toward the wrist
  const neck = isPresent(body[NECK]) ? body[NECK] : [frame.width / 2, wrist[1]];
  let side = (wrist[0] - neck[0]) * across[0] + (wrist[1] - neck[1]) * across[1];
  if (Math.abs(side) < 1e-6) side = part === "hand_left" ? across[0] : -across[0];
  if (side < 0) across = [-across[0], -across[1]];
  const clamp = (v, top) => Math.min(top, Math.max(0, v));
  return HAND_TEMPLATE.map(([u, v]) => [
    px(clamp(wrist[0] + length * (u * along[0] + v * across[0]), frame.width)),
    px(clamp(wrist[1] + length * (u * along[1] + v * across[1]), frame.height)),
  ]);
}
