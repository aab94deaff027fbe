// The pose editor dialog: an SVG skeleton over the padded image, edited by mouse and keyboard, for
// every person of the pose: body joints, hand and face points, whole hands added at a wrist or
// deleted, parts shown or hidden, zoom and pan. State is the list of edit operations (see
// pose_edits.js); every change is written to the node's `edits` widget at once, and undo/redo step
// through the lists this dialog produced.

import {
  BODY_NAMES, COLORS, HAND_BONES, HAND_COLORS, LIMBS, L_WRIST, PARTS, R_WRIST, applyEdits, defaultHand,
  formatEdits, isPresent, parseEdits, placeForMissing, pointName, px, readFrame, withOperation,
} from "./pose_edits.js";

const SVG = "http://www.w3.org/2000/svg";
const STYLESHEET_ID = "cs-pose-editor-style";
const JOINT_RADIUS = 7; // screen pixels, whatever the image's size or the zoom
const POINT_RADIUS = { body: JOINT_RADIUS, hand_left: 4.5, hand_right: 4.5, face: 3.5 };
const MAX_ZOOM = 16;
const MODES = ["point", "person", "part"];
const SHOWN = { body: "Body", hands: "Hands", face: "Face" };
const HELP = "Drag a point to move it, a body bone to move the person, a hand bone to move the hand, the "
  + "image to pan; the wheel zooms. Keys: Tab to a point, arrows move it (Shift: 10 px), P: arrows move the "
  + "point, the whole person or the point's part, N / Shift+N: next / previous person, Delete removes the "
  + "point, Shift+Delete its part, A adds a hand at the selected wrist, B / H / F show or hide body, hands, "
  + "face, + / - / 0 zoom in, out, to fit, Alt+arrows pan, M mirrors left and right, Ctrl+Z / Ctrl+Y undo "
  + "and redo, Esc closes.";

function viewGroup(part) {
  return part === "body" ? "body" : part === "face" ? "face" : "hands";
}

/** The dialog's stylesheet, beside this file wherever the pack is installed; resolves once it
 * applies, so the dialog never shows (or measures itself) unstyled. */
function loadStylesheet() {
  let link = document.getElementById(STYLESHEET_ID);
  if (!link) {
    link = document.createElement("link");
    link.id = STYLESHEET_ID;
    link.rel = "stylesheet";
    link.href = new URL("./pose_editor.css", import.meta.url).href;
    link.loading = new Promise((resolve) => {
      link.addEventListener("load", resolve, { once: true });
      link.addEventListener("error", () => {
        console.warn(`Pose editor: could not load ${link.href}`);
        resolve();
      }, { once: true });
    });
    document.head.appendChild(link);
  }
  return link.loading ?? Promise.resolve();
}

function el(tag, attrs = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

function svgEl(tag, attrs = {}) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  return node;
}

function rgb([r, g, b], scale = 1) {
  return `rgb(${Math.round(r * scale)}, ${Math.round(g * scale)}, ${Math.round(b * scale)})`;
}

function imageUrl(app, image) {
  const query = new URLSearchParams({ filename: image.filename, type: image.type ?? "temp",
    subfolder: image.subfolder ?? "" });
  return app.api?.apiURL ? app.api.apiURL(`/view?${query}`) : `/api/view?${query}`;
}

function pointKey(person, part, index) {
  return `${person}/${part}/${index}`;
}

/** Open the editor. `editsWidget` is the node's `edits` widget; `run` the last run's
 * {image, poseBase} (null before the node has run). Resolves to {close, element} once open. */
export async function openPoseEditor({ app, title, editsWidget, run, onChange }) {
  await loadStylesheet();
  const state = {
    base: null, ops: [], undo: [], redo: [], selected: null, person: 0, mode: "point", drag: null,
    error: null, hidden: { body: false, hands: false, face: false }, view: null,
  };

  const dialog = el("div", { class: "cs-pose-editor", role: "dialog", "aria-modal": "true",
    "aria-label": "Pose editor", tabindex: "-1" });
  const backdrop = el("div", { class: "cs-pose-editor-backdrop" }, [dialog]);
  const status = el("div", { class: "cs-pose-status", role: "status", "aria-live": "polite" });
  const side = el("aside", { class: "cs-pose-side" });
  const stage = el("div", { class: "cs-pose-stage" });
  const notice = el("p", { class: "cs-pose-message", role: "alert" });
  const zoomLabel = el("span", { class: "cs-pose-zoom", "data-zoom": "", text: "100 %" });
  const buttons = {};
  const button = (name, label, action, hint) => {
    buttons[name] = el("button", { type: "button", class: "cs-pose-button", "data-action": name,
      title: hint ?? label, onclick: action, text: label });
    return buttons[name];
  };

  dialog.append(
    el("header", { class: "cs-pose-header" }, [
      el("h2", { text: `Pose editor — ${title ?? "PoseEditOutpaint"}` }),
      button("close", "Close", close, "Close the editor (Esc); the edits are already saved"),
    ]),
    el("div", { class: "cs-pose-toolbar", role: "toolbar" }, [
      button("undo", "Undo", undo, "Undo (Ctrl+Z)"),
      button("redo", "Redo", redo, "Redo (Ctrl+Y)"),
      button("mirror", "Mirror left/right", mirror, "Swap the left and right joints of the person (M)"),
      button("delete", "Delete point", removeSelected, "Remove the selected point (Delete)"),
      button("deletePart", "Delete part", () => removePart(state.selected?.person, state.selected?.part),
        "Delete the selected point's hand or face, or every body point (Shift+Delete)"),
      button("mode", "Arrows move: point", cycleMode,
        "Arrows move the point, the whole person or the point's part (P)"),
      button("show-body", "Body", () => toggleShown("body"), "Show or hide the bodies (B)"),
      button("show-hands", "Hands", () => toggleShown("hands"), "Show or hide the hands (H)"),
      button("show-face", "Face", () => toggleShown("face"), "Show or hide the faces (F)"),
      button("zoomOut", "−", () => zoomBy(1 / 1.5), "Zoom out (-)"),
      zoomLabel,
      button("zoomIn", "+", () => zoomBy(1.5), "Zoom in (+)"),
      button("fit", "Fit", fit, "Show the whole canvas (0)"),
      button("reset", "Reset to detected pose", reset, "Drop every edit"),
    ]),
    notice,
    el("div", { class: "cs-pose-main" }, [stage, side]),
    status,
    el("p", { class: "cs-pose-help", text: HELP }),
  );

  // While the dialog is open the graph must not take its keys (Ctrl+Z would undo the graph, Delete
  // would delete nodes): the frontend's hook for modal editors, restored when the dialog closes.
  const ComfyApp = app.constructor;
  const previousModalHook = ComfyApp.maskeditor_is_opended;
  ComfyApp.maskeditor_is_opended = () => true;
  const previousFocus = document.activeElement;

  let svg = null;
  if (!editsWidget) {
    state.error = "This node has no `edits` widget (is `edits` connected to an input?).";
  } else if (!run) {
    state.error = "Run the workflow once: the editor shows the padded image and the pose of the node's last run.";
  } else {
    try {
      state.base = readFrame(run.poseBase);
    } catch (e) {
      state.error = `The pose of the last run cannot be read: ${e.message}.`;
    }
    try {
      state.ops = parseEdits(editsWidget.value ?? "");
    } catch (e) {
      state.error ??= `The edits cannot be read: ${e.message}. "Reset to detected pose" starts over.`;
    }
    if (state.base) {
      state.view = { x: 0, y: 0, w: state.base.width, h: state.base.height };
      svg = svgEl("svg", { viewBox: `0 0 ${state.base.width} ${state.base.height}`, class: "cs-pose-svg",
        role: "group", "aria-label": "Skeleton over the padded image" });
      if (run.image) {
        const image = svgEl("image", { href: imageUrl(app, run.image), x: 0, y: 0, width: state.base.width,
          height: state.base.height, preserveAspectRatio: "none", class: "cs-pose-image" });
        image.addEventListener("error", () => say("The padded image of the last run could not be loaded."));
        svg.append(image);
      } else {
        svg.append(svgEl("rect", { width: state.base.width, height: state.base.height, fill: "#777",
          class: "cs-pose-image" }));
      }
      svg.append(svgEl("g", { class: "cs-pose-bones" }), svgEl("g", { class: "cs-pose-points" }));
      stage.append(svg);
      svg.addEventListener("pointerdown", onPointerDown);
      svg.addEventListener("pointermove", onPointerMove);
      svg.addEventListener("pointerup", onPointerUp);
      svg.addEventListener("pointercancel", cancelDrag);
      svg.addEventListener("focusin", onFocus);
      svg.addEventListener("wheel", onWheel, { passive: false });
    }
  }

  // Capture at the window: every key goes to the dialog while it is open, also when the focus has
  // fallen out of it (onto the page behind), so none reaches the graph's shortcuts.
  window.addEventListener("keydown", onKey, true);
  backdrop.addEventListener("pointerdown", (e) => { if (e.target === backdrop) close(); });
  document.body.append(backdrop);
  const resize = new ResizeObserver(() => render());
  if (svg) resize.observe(svg);
  render();
  dialog.focus();
  if (svg) svg.querySelector(".cs-pose-joint[tabindex='0']")?.focus({ preventScroll: true });

  // ---- state changes ----

  function commit(ops) {
    if (formatEdits(ops) === formatEdits(state.ops)) return;
    state.undo.push(state.ops);
    state.redo = [];
    state.ops = ops;
    save();
  }

  function save() {
    editsWidget.value = formatEdits(state.ops);
    editsWidget.callback?.(editsWidget.value);
    onChange?.();
    render();
  }

  function undo() {
    if (!state.undo.length) return;
    state.redo.push(state.ops);
    state.ops = state.undo.pop();
    save();
  }

  function redo() {
    if (!state.redo.length) return;
    state.undo.push(state.ops);
    state.ops = state.redo.pop();
    save();
  }

  function reset() {
    if (state.error && state.base) {
      // unreadable edits: start over from the pose of the last run
      state.error = null;
      state.ops = [];
      save();
      return;
    }
    commit([]);
  }

  function edited() {
    return applyEdits(state.base, state.drag?.preview ?? state.ops);
  }

  function people() {
    return state.base?.people.length ?? 0;
  }

  function mirror() {
    if (!people()) return;
    commit([...state.ops, { op: "mirror", person: state.person }]);
  }

  function removeSelected() {
    const s = state.selected;
    if (!s || !isPresent(edited().frame.people[s.person]?.[s.part]?.[s.index])) return;
    commit(withOperation(state.ops, { op: "remove", person: s.person, part: s.part, index: s.index }));
    say(`Removed the ${pointName(s.part, s.index)} of person ${s.person + 1}.`);
  }

  function removePart(person, part) {
    if (person === undefined || !part || !edited().frame.people[person]?.[part]) return;
    commit([...state.ops, { op: "remove_part", person, part }]);
    if (state.selected?.person === person && state.selected.part === part) state.selected = null;
    const what = part === "body" ? "body points" : part === "face" ? "face" : pointName(part);
    say(`Deleted the ${what} of person ${person + 1}.`);
    render();
  }

  function addHand(person, part) {
    const points = defaultHand(edited().frame, person, part);
    if (!points) {
      say(`Person ${person + 1} has no ${part === "hand_left" ? "left" : "right"} wrist: add it first.`);
      return;
    }
    state.hidden.hands = false;
    commit([...state.ops, { op: "set_part", person, part, points }]);
    select({ person, part, index: 0 }, true);
    say(`Added a ${pointName(part)} at the wrist of person ${person + 1}: drag its points or the whole hand.`);
  }

  function addHandAtSelection() {
    const frame = edited().frame;
    const person = frame.people[state.person];
    if (!person) return;
    const s = state.selected;
    let part = null;
    if (s?.part === "body" && (s.index === R_WRIST || s.index === L_WRIST)) {
      part = s.index === R_WRIST ? "hand_right" : "hand_left";
    } else {
      part = ["hand_right", "hand_left"].find((h) => !person[h]
        && isPresent(person.body[h === "hand_right" ? R_WRIST : L_WRIST])) ?? null;
    }
    if (!part) say("Select a wrist without a hand to add one there.");
    else if (person[part]) say(`Person ${state.person + 1} already has a ${pointName(part)}.`);
    else addHand(state.person, part);
  }

  function addMissing(person, index) {
    const [x, y] = placeForMissing(edited().frame, person, index);
    state.hidden.body = false;
    commit(withOperation(state.ops, { op: "set", person, part: "body", index, x, y }));
    select({ person, part: "body", index }, true);
    say(`Added the ${BODY_NAMES[index]}: drag it or move it with the arrow keys.`);
  }

  function cycleMode() {
    state.mode = MODES[(MODES.indexOf(state.mode) + 1) % MODES.length];
    render();
  }

  function toggleShown(group) {
    state.hidden[group] = !state.hidden[group];
    say(`${SHOWN[group]} ${state.hidden[group] ? "hidden" : "shown"}.`);
    render();
  }

  function nudge(dx, dy) {
    const s = state.selected;
    if (!s) return;
    if (state.mode === "person") {
      commit(withOperation(state.ops, { op: "translate", person: s.person, dx, dy }));
      return;
    }
    if (state.mode === "part") {
      commit(withOperation(state.ops, { op: "translate", person: s.person, part: s.part, dx, dy }));
      return;
    }
    const point = edited().frame.people[s.person]?.[s.part]?.[s.index];
    if (!isPresent(point)) return;
    commit(withOperation(state.ops, { op: "set", person: s.person, part: s.part, index: s.index,
      x: px(point[0] + dx), y: px(point[1] + dy) }));
    keepInView(px(point[0] + dx), px(point[1] + dy));
  }

  function select(point, focus = false) {
    state.selected = point;
    if (point) switchTo(point.person);
    render();
    if (focus && point) svg?.querySelector(`[data-key="${pointKey(point.person, point.part, point.index)}"]`)?.focus();
  }

  function switchTo(p) {
    if (p === state.person) return;
    state.person = p;
    say(`Editing person ${p + 1} of ${people()}.`);
  }

  /** Make person `p` the one being edited, with its first shown point selected and focused. */
  function selectPerson(p) {
    if (!(p >= 0 && p < people())) return;
    state.person = p;
    const person = edited().frame.people[p];
    let first = null;
    for (const part of Object.keys(PARTS)) {
      if (state.hidden[viewGroup(part)]) continue;
      const i = (person[part] ?? []).findIndex(isPresent);
      if (i >= 0) {
        first = { person: p, part, index: i };
        break;
      }
    }
    state.selected = first;
    render();
    if (first) {
      const [x, y] = person[first.part][first.index];
      keepInView(x, y);
      svg?.querySelector(`[data-key="${pointKey(p, first.part, first.index)}"]`)?.focus({ preventScroll: true });
    }
    say(`Editing person ${p + 1} of ${people()}.`);
  }

  function say(text) {
    status.textContent = text;
  }

  function close() {
    resize.disconnect();
    window.removeEventListener("keydown", onKey, true);
    backdrop.remove();
    ComfyApp.maskeditor_is_opended = previousModalHook;
    if (previousFocus?.isConnected) previousFocus.focus?.({ preventScroll: true });
  }

  // ---- zoom and pan (the SVG's viewBox, in canvas pixels) ----

  function zoom() {
    return state.base ? state.base.width / state.view.w : 1;
  }

  function setView(x, y, w, h) {
    const { width, height } = state.base;
    w = Math.min(width, Math.max(width / MAX_ZOOM, w));
    h = w * height / width;
    state.view = { x: Math.min(width - w, Math.max(0, x)), y: Math.min(height - h, Math.max(0, y)), w, h };
    render();
  }

  /** Zoom by `factor` keeping the canvas point (cx, cy) where it is on screen (default: the selected
   * point, else the middle of the view). */
  function zoomBy(factor, cx, cy) {
    if (!state.base) return;
    const v = state.view;
    if (cx === undefined) {
      const s = state.selected;
      const point = s && edited().frame.people[s.person]?.[s.part]?.[s.index];
      [cx, cy] = isPresent(point) ? [point[0], point[1]] : [v.x + v.w / 2, v.y + v.h / 2];
    }
    const w = Math.min(state.base.width, Math.max(state.base.width / MAX_ZOOM, v.w / factor));
    const k = w / v.w;
    setView(cx - (cx - v.x) * k, cy - (cy - v.y) * k, w, w * v.h / v.w);
  }

  function fit() {
    if (state.base) setView(0, 0, state.base.width, state.base.height);
  }

  function pan(dx, dy) {
    setView(state.view.x + dx, state.view.y + dy, state.view.w, state.view.h);
  }

  function keepInView(x, y) {
    const v = state.view;
    if (!v || (x >= v.x && x <= v.x + v.w && y >= v.y && y <= v.y + v.h)) return;
    setView(x - v.w / 2, y - v.h / 2, v.w, v.h);
  }

  function onWheel(event) {
    if (!state.base || state.error) return;
    event.preventDefault();
    const [x, y] = toCanvas(event);
    zoomBy(event.deltaY < 0 ? 1.25 : 1 / 1.25, x, y);
  }

  // ---- mouse ----

  function toCanvas(event) {
    const m = svg.getScreenCTM().inverse();
    return [m.a * event.clientX + m.c * event.clientY + m.e, m.b * event.clientX + m.d * event.clientY + m.f];
  }

  function onPointerDown(event) {
    if (event.button !== 0 || state.error) return;
    event.preventDefault();
    const target = event.target.closest("[data-part], [data-bone-of]");
    const start = toCanvas(event);
    if (!target) {
      state.drag = { kind: "pan", client: [event.clientX, event.clientY], view: { ...state.view },
        unit: 1 / svg.getScreenCTM().a, preview: null };
    } else if (target.dataset.part) {
      const point = { person: +target.dataset.person, part: target.dataset.part, index: +target.dataset.index };
      const [x, y] = edited().frame.people[point.person][point.part][point.index];
      state.drag = { kind: "point", point, start, origin: [x, y], preview: null };
      state.selected = point;
      switchTo(point.person);
      target.focus({ preventScroll: true });
    } else {
      const person = +target.dataset.boneOf;
      const part = target.dataset.bonePart === "body" ? null : target.dataset.bonePart;
      state.drag = { kind: "person", person, part, start, preview: null };
      switchTo(person);
      state.selected = state.selected?.person === person && (!part || state.selected.part === part)
        ? state.selected : { person, part: part ?? "body", index: part ? 0 : 1 };
    }
    svg.setPointerCapture(event.pointerId);
    render();
  }

  function dragOperation(event) {
    const [x, y] = toCanvas(event);
    const d = state.drag;
    const dx = x - d.start[0], dy = y - d.start[1];
    if (d.kind === "point") {
      const { person, part, index } = d.point;
      const nx = Math.min(state.base.width, Math.max(0, d.origin[0] + dx));
      const ny = Math.min(state.base.height, Math.max(0, d.origin[1] + dy));
      return { op: "set", person, part, index, x: px(nx), y: px(ny) };
    }
    return { op: "translate", person: d.person, ...(d.part ? { part: d.part } : {}), dx: px(dx), dy: px(dy) };
  }

  function onPointerMove(event) {
    const d = state.drag;
    if (!d) return;
    if (d.kind === "pan") {
      d.preview = null;
      d.moved = true;
      setView(d.view.x - (event.clientX - d.client[0]) * d.unit, d.view.y - (event.clientY - d.client[1]) * d.unit,
        d.view.w, d.view.h);
      return;
    }
    d.preview = withOperation(state.ops, dragOperation(event));
    render();
  }

  function onPointerUp(event) {
    const d = state.drag;
    if (!d) return;
    svg.releasePointerCapture?.(event.pointerId);
    if (d.kind === "pan") {
      state.drag = null;
      render();
      return;
    }
    const op = d.preview !== null ? dragOperation(event) : null;
    state.drag = null;
    if (op && (op.op === "set" || op.dx !== 0 || op.dy !== 0)) commit(withOperation(state.ops, op));
    else render();
  }

  function cancelDrag() {
    state.drag = null;
    render();
  }

  // ---- keyboard ----

  function onFocus(event) {
    const target = event.target.closest?.("[data-part]");
    if (!target || state.drag) return;
    const point = { person: +target.dataset.person, part: target.dataset.part, index: +target.dataset.index };
    if (pointKey(point.person, point.part, point.index) !== selectedKey()) select(point);
  }

  function selectedKey() {
    const s = state.selected;
    return s ? pointKey(s.person, s.part, s.index) : null;
  }

  function onKey(event) {
    event.stopPropagation();
    const ctrl = event.ctrlKey || event.metaKey;
    const key = event.key;
    const plain = !ctrl && !event.altKey;
    let handled = true;
    if (key === "Escape") {
      if (state.drag) cancelDrag();
      else close();
    } else if (ctrl && (key === "z" || key === "Z")) {
      if (event.shiftKey) redo();
      else undo();
    } else if (ctrl && (key === "y" || key === "Y")) {
      redo();
    } else if (state.error || !state.base || event.target.tagName === "BUTTON" && (key === "Enter" || key === " ")) {
      handled = false;
    } else if (key === "Delete" || key === "Backspace") {
      if (event.shiftKey) removePart(state.selected?.person, state.selected?.part);
      else removeSelected();
    } else if (key.startsWith("Arrow")) {
      const step = event.shiftKey ? 10 : 1;
      const [dx, dy] = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] }[key];
      if (event.altKey) pan(dx * state.view.w / 10, dy * state.view.h / 10);
      else nudge(dx * step, dy * step);
    } else if (plain && (key === "m" || key === "M")) {
      mirror();
    } else if (plain && (key === "p" || key === "P")) {
      cycleMode();
    } else if (plain && (key === "n" || key === "N")) {
      selectPerson((state.person + (event.shiftKey ? people() - 1 : 1)) % Math.max(1, people()));
    } else if (plain && (key === "a" || key === "A")) {
      addHandAtSelection();
    } else if (plain && (key === "b" || key === "B")) {
      toggleShown("body");
    } else if (plain && (key === "h" || key === "H")) {
      toggleShown("hands");
    } else if (plain && (key === "f" || key === "F")) {
      toggleShown("face");
    } else if (plain && (key === "+" || key === "=")) {
      zoomBy(1.5);
    } else if (plain && (key === "-" || key === "_")) {
      zoomBy(1 / 1.5);
    } else if (plain && key === "0") {
      fit();
    } else {
      handled = false;
    }
    if (handled) event.preventDefault();
  }

  // ---- drawing ----

  function render() {
    buttons.undo.disabled = !state.undo.length;
    buttons.redo.disabled = !state.redo.length;
    const idle = !!state.error || !state.base;
    for (const name of ["mirror", "delete", "deletePart", "mode", "zoomIn", "zoomOut", "fit", "show-body",
      "show-hands", "show-face"]) buttons[name].disabled = idle;
    buttons.reset.disabled = !state.base;
    buttons.mode.textContent = `Arrows move: ${state.mode}`;
    buttons.mode.setAttribute("aria-pressed", String(state.mode !== "point"));
    for (const group of Object.keys(SHOWN)) {
      buttons[`show-${group}`].setAttribute("aria-pressed", String(!state.hidden[group]));
    }
    notice.textContent = state.error ?? "";
    notice.hidden = !state.error;
    if (svg) svg.style.visibility = state.error ? "hidden" : "";
    if (state.error || !svg) {
      side.replaceChildren();
      return;
    }
    const v = state.view;
    svg.setAttribute("viewBox", `${v.x} ${v.y} ${v.w} ${v.h}`);
    zoomLabel.textContent = `${Math.round(zoom() * 100)} %`;
    const { frame, problems } = edited();
    drawSkeleton(frame);
    drawSide(frame, problems);
  }

  function drawSkeleton(frame) {
    const ctm = svg.getScreenCTM();
    const unit = ctm && ctm.a > 0 ? 1 / ctm.a : Math.max(state.view.w, state.view.h) / 600;
    const bones = svg.querySelector(".cs-pose-bones");
    const points = svg.querySelector(".cs-pose-points");
    const focusedKey = document.activeElement?.dataset?.key;
    bones.replaceChildren();
    points.replaceChildren();
    // the person being edited is drawn last, on top; the others are dimmed
    const order = frame.people.map((_, p) => p).filter((p) => p !== state.person);
    if (state.person < frame.people.length) order.push(state.person);
    for (const p of order) {
      const person = frame.people[p];
      const other = p !== state.person;
      const boneGroup = svgEl("g", { class: `cs-pose-person${other ? " cs-pose-other" : ""}`, "data-person-of": p });
      const pointGroup = svgEl("g", { class: `cs-pose-person${other ? " cs-pose-other" : ""}`, "data-person-of": p });
      if (!state.hidden.body) {
        LIMBS.forEach(([a, b], i) => {
          const [pa, pb] = [person.body[a], person.body[b]];
          if (isPresent(pa) && isPresent(pb)) {
            boneGroup.append(svgEl("line", { x1: pa[0], y1: pa[1], x2: pb[0], y2: pb[1], "data-bone-of": p,
              "data-bone-part": "body", class: "cs-pose-bone", stroke: rgb(COLORS[i], 0.75),
              "stroke-width": 5 * unit }));
          }
        });
      }
      if (!state.hidden.hands) {
        for (const hand of ["hand_left", "hand_right"]) {
          HAND_BONES.forEach(([a, b], i) => {
            const [pa, pb] = [person[hand]?.[a], person[hand]?.[b]];
            if (isPresent(pa) && isPresent(pb)) {
              boneGroup.append(svgEl("line", { x1: pa[0], y1: pa[1], x2: pb[0], y2: pb[1], "data-bone-of": p,
                "data-bone-part": hand, class: "cs-pose-bone cs-pose-hand-bone", stroke: rgb(HAND_COLORS[i]),
                "stroke-width": 3 * unit }));
            }
          });
        }
      }
      for (const part of Object.keys(PARTS)) {
        if (state.hidden[viewGroup(part)]) continue;
        (person[part] ?? []).forEach((point, i) => {
          if (!isPresent(point)) return;
          const key = pointKey(p, part, i);
          const fill = part === "body" ? rgb(COLORS[i]) : part === "face" ? "#fff" : "#36f";
          const circle = svgEl("circle", { cx: point[0], cy: point[1], r: POINT_RADIUS[part] * unit, fill,
            tabindex: other ? -1 : 0, role: "button", class: `cs-pose-joint cs-pose-${part}`, "data-key": key,
            "data-person": p, "data-part": part, "data-index": i,
            "stroke-width": (part === "body" ? 2 : 1) * unit,
            "aria-label": `${pointName(part, i)} of person ${p + 1} at ${px(point[0])}, ${px(point[1])}` });
          if (key === selectedKey()) circle.classList.add("cs-pose-selected");
          pointGroup.append(circle);
        });
      }
      bones.append(boneGroup);
      points.append(pointGroup);
    }
    if (focusedKey) {
      // the focused point was drawn anew, or removed: keep the focus in the dialog
      const again = points.querySelector(`[data-key="${focusedKey}"]`);
      (again ?? dialog).focus({ preventScroll: true });
    }
  }

  function drawSide(frame, problems) {
    const s = state.selected;
    const children = [];
    if (frame.people.length > 1) {
      children.push(el("h3", { text: "People" }));
      children.push(el("div", { class: "cs-pose-people", role: "group", "aria-label": "People" },
        frame.people.map((person, p) => el("button", {
          type: "button", class: "cs-pose-button", "data-person-button": p, "aria-pressed": String(p === state.person),
          text: `Person ${p + 1}`, title: `Edit person ${p + 1} (N / Shift+N)`, onclick: () => selectPerson(p),
        }))));
    }
    if (s && frame.people[s.person]) {
      const point = frame.people[s.person][s.part]?.[s.index];
      children.push(el("p", { class: "cs-pose-selection", text: isPresent(point)
        ? `Person ${s.person + 1}, ${pointName(s.part, s.index)}: x ${px(point[0])}, y ${px(point[1])}`
        : `Person ${s.person + 1}, ${pointName(s.part, s.index)}: missing` }));
    } else {
      children.push(el("p", { text: frame.people.length ? "Select a point." : "No person in the pose." }));
    }
    const person = frame.people[state.person];
    if (person) {
      const n = state.person + 1;
      children.push(el("h3", { text: `Parts of person ${n}` }));
      const rows = [];
      for (const [part, label, wrist] of [["hand_left", "Left hand", L_WRIST], ["hand_right", "Right hand", R_WRIST],
        ["face", "Face", null]]) {
        const has = !!person[part];
        const detail = has ? `${person[part].filter(isPresent).length} of ${person[part].length} points` : "none";
        const row = [el("span", { text: `${label}: ${detail}` })];
        if (has) {
          row.push(el("button", { type: "button", class: "cs-pose-button", "data-remove-part": part,
            text: `Delete ${label.toLowerCase()}`,
            title: `Delete the ${label.toLowerCase()} of person ${n} (Shift+Delete)`,
            onclick: () => removePart(state.person, part) }));
        } else if (wrist !== null) {
          const add = el("button", { type: "button", class: "cs-pose-button", "data-add-hand": part,
            text: `+ ${label.toLowerCase()} at wrist`, onclick: () => addHand(state.person, part),
            title: isPresent(person.body[wrist]) ? `Place an open hand at the wrist of person ${n} (A)`
              : "Add the wrist first" });
          add.disabled = !isPresent(person.body[wrist]);
          row.push(add);
        }
        rows.push(el("div", { class: "cs-pose-part" }, row));
      }
      children.push(el("div", { class: "cs-pose-parts" }, rows));
      const missing = BODY_NAMES.map((_, i) => i).filter((i) => !isPresent(person.body[i]));
      children.push(el("h3", { text: missing.length ? `Missing joints of person ${n}`
        : `Person ${n} has every body joint` }));
      children.push(el("div", { class: "cs-pose-missing" }, missing.map((i) => el("button", {
        type: "button", class: "cs-pose-button", "data-add": i, text: `+ ${BODY_NAMES[i]}`,
        title: `Add the ${BODY_NAMES[i]} near its neighbour`, onclick: () => addMissing(state.person, i),
      }))));
    }
    const count = state.ops.length;
    children.push(el("p", { class: "cs-pose-count", text: `${count} edit${count === 1 ? "" : "s"}` }));
    for (const problem of problems) children.push(el("p", { class: "cs-pose-problem", text: problem }));
    side.replaceChildren(...children);
  }

  return { close, element: dialog };
}
