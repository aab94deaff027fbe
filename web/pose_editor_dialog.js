// The pose editor dialog: an SVG skeleton over the padded image, edited by mouse and keyboard.
// State is the list of edit operations (see pose_edits.js); every change is written to the node's
// `edits` widget at once, and undo/redo step through the lists this dialog produced.

import {
  BODY_NAMES, COLORS, HAND_BONES, LIMBS, PARTS, applyEdits, formatEdits, isPresent, parseEdits,
  placeForMissing, pointName, px, readFrame, withOperation,
} from "./pose_edits.js";

const SVG = "http://www.w3.org/2000/svg";
const STYLESHEET_ID = "cs-pose-editor-style";
const JOINT_RADIUS = 7; // screen pixels, whatever the image's size
const HELP = "Drag a joint to move it, a bone to move the person. Keys: Tab to a joint, arrows move it "
  + "(Shift: 10 px), P: arrows move the whole person, Delete removes the joint, M mirrors left and right, "
  + "Ctrl+Z / Ctrl+Y undo and redo, Esc closes.";

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
    base: null, ops: [], undo: [], redo: [], selected: null, personMode: false, drag: null,
    error: null,
  };

  const dialog = el("div", { class: "cs-pose-editor", role: "dialog", "aria-modal": "true",
    "aria-label": "Pose editor", tabindex: "-1" });
  const backdrop = el("div", { class: "cs-pose-editor-backdrop" }, [dialog]);
  const status = el("div", { class: "cs-pose-status", role: "status", "aria-live": "polite" });
  const side = el("aside", { class: "cs-pose-side" });
  const stage = el("div", { class: "cs-pose-stage" });
  const notice = el("p", { class: "cs-pose-message", role: "alert" });
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
      button("delete", "Delete joint", removeSelected, "Remove the selected joint (Delete)"),
      button("mode", "Arrows move: joint", toggleMode, "Arrows move the joint or the whole person (P)"),
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
      svg = svgEl("svg", { viewBox: `0 0 ${state.base.width} ${state.base.height}`, class: "cs-pose-svg",
        role: "group", "aria-label": "Skeleton over the padded image" });
      if (run.image) {
        const image = svgEl("image", { href: imageUrl(app, run.image), x: 0, y: 0, width: state.base.width,
          height: state.base.height, preserveAspectRatio: "none" });
        image.addEventListener("error", () => say("The padded image of the last run could not be loaded."));
        svg.append(image);
      } else {
        svg.append(svgEl("rect", { width: state.base.width, height: state.base.height, fill: "#777" }));
      }
      svg.append(svgEl("g", { class: "cs-pose-bones" }), svgEl("g", { class: "cs-pose-points" }));
      stage.append(svg);
      svg.addEventListener("pointerdown", onPointerDown);
      svg.addEventListener("pointermove", onPointerMove);
      svg.addEventListener("pointerup", onPointerUp);
      svg.addEventListener("pointercancel", cancelDrag);
      svg.addEventListener("focusin", onFocus);
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
  if (svg) svg.querySelector(".cs-pose-joint")?.focus({ preventScroll: true });

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

  function selectedPerson() {
    return state.selected?.person ?? 0;
  }

  function mirror() {
    if (!state.base?.people.length) return;
    commit([...state.ops, { op: "mirror", person: selectedPerson() }]);
  }

  function removeSelected() {
    const s = state.selected;
    if (!s || !isPresent(edited().frame.people[s.person]?.[s.part]?.[s.index])) return;
    commit(withOperation(state.ops, { op: "remove", person: s.person, part: s.part, index: s.index }));
    say(`Removed the ${pointName(s.part, s.index)}.`);
  }

  function addMissing(person, index) {
    const [x, y] = placeForMissing(edited().frame, person, index);
    commit(withOperation(state.ops, { op: "set", person, part: "body", index, x, y }));
    select({ person, part: "body", index }, true);
    say(`Added the ${BODY_NAMES[index]}: drag it or move it with the arrow keys.`);
  }

  function toggleMode() {
    state.personMode = !state.personMode;
    render();
  }

  function nudge(dx, dy) {
    const s = state.selected;
    if (!s) return;
    if (state.personMode) {
      commit(withOperation(state.ops, { op: "translate", person: s.person, dx, dy }));
      return;
    }
    const point = edited().frame.people[s.person]?.[s.part]?.[s.index];
    if (!isPresent(point)) return;
    commit(withOperation(state.ops, { op: "set", person: s.person, part: s.part, index: s.index,
      x: px(point[0] + dx), y: px(point[1] + dy) }));
  }

  function select(point, focus = false) {
    state.selected = point;
    render();
    if (focus) svg?.querySelector(`[data-key="${pointKey(point.person, point.part, point.index)}"]`)?.focus();
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

  // ---- mouse ----

  function toCanvas(event) {
    const m = svg.getScreenCTM().inverse();
    return [m.a * event.clientX + m.c * event.clientY + m.e, m.b * event.clientX + m.d * event.clientY + m.f];
  }

  function onPointerDown(event) {
    if (event.button !== 0 || state.error) return;
    const target = event.target.closest("[data-part], [data-bone-of]");
    if (!target) return;
    event.preventDefault();
    const start = toCanvas(event);
    if (target.dataset.part) {
      const point = { person: +target.dataset.person, part: target.dataset.part, index: +target.dataset.index };
      const [x, y] = edited().frame.people[point.person][point.part][point.index];
      state.drag = { kind: "joint", point, start, origin: [x, y], preview: null };
      state.selected = point;
      target.focus({ preventScroll: true });
    } else {
      state.drag = { kind: "person", person: +target.dataset.boneOf, start, preview: null };
      state.selected = state.selected?.person === state.drag.person ? state.selected
        : { person: state.drag.person, part: "body", index: 1 };
    }
    svg.setPointerCapture(event.pointerId);
    render();
  }

  function dragOperation(event) {
    const [x, y] = toCanvas(event);
    const d = state.drag;
    const dx = x - d.start[0], dy = y - d.start[1];
    if (d.kind === "joint") {
      const { person, part, index } = d.point;
      const nx = Math.min(state.base.width, Math.max(0, d.origin[0] + dx));
      const ny = Math.min(state.base.height, Math.max(0, d.origin[1] + dy));
      return { op: "set", person, part, index, x: px(nx), y: px(ny) };
    }
    return { op: "translate", person: d.person, dx: px(dx), dy: px(dy) };
  }

  function onPointerMove(event) {
    if (!state.drag) return;
    state.drag.preview = withOperation(state.ops, dragOperation(event));
    render();
  }

  function onPointerUp(event) {
    if (!state.drag) return;
    const moved = state.drag.preview !== null;
    const op = moved ? dragOperation(event) : null;
    state.drag = null;
    svg.releasePointerCapture?.(event.pointerId);
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
      removeSelected();
    } else if (key.startsWith("Arrow")) {
      const step = event.shiftKey ? 10 : 1;
      const [dx, dy] = { ArrowLeft: [-step, 0], ArrowRight: [step, 0], ArrowUp: [0, -step], ArrowDown: [0, step] }[key];
      nudge(dx, dy);
    } else if (!ctrl && (key === "m" || key === "M")) {
      mirror();
    } else if (!ctrl && (key === "p" || key === "P")) {
      toggleMode();
    } else {
      handled = false;
    }
    if (handled) event.preventDefault();
  }

  // ---- drawing ----

  function render() {
    buttons.undo.disabled = !state.undo.length;
    buttons.redo.disabled = !state.redo.length;
    for (const name of ["mirror", "delete", "mode"]) buttons[name].disabled = !!state.error || !state.base;
    buttons.reset.disabled = !state.base;
    buttons.mode.textContent = `Arrows move: ${state.personMode ? "person" : "joint"}`;
    buttons.mode.setAttribute("aria-pressed", String(state.personMode));
    notice.textContent = state.error ?? "";
    notice.hidden = !state.error;
    if (svg) svg.style.visibility = state.error ? "hidden" : "";
    if (state.error || !svg) {
      side.replaceChildren();
      return;
    }
    const { frame, problems } = edited();
    drawSkeleton(frame);
    drawSide(frame, problems);
  }

  function drawSkeleton(frame) {
    const ctm = svg.getScreenCTM();
    const unit = ctm && ctm.a > 0 ? 1 / ctm.a : Math.max(frame.width, frame.height) / 600;
    const bones = svg.querySelector(".cs-pose-bones");
    const points = svg.querySelector(".cs-pose-points");
    const focusedKey = document.activeElement?.dataset?.key;
    bones.replaceChildren();
    points.replaceChildren();
    frame.people.forEach((person, p) => {
      LIMBS.forEach(([a, b], i) => {
        const [pa, pb] = [person.body[a], person.body[b]];
        if (isPresent(pa) && isPresent(pb)) {
          bones.append(svgEl("line", { x1: pa[0], y1: pa[1], x2: pb[0], y2: pb[1], "data-bone-of": p,
            class: "cs-pose-bone", stroke: rgb(COLORS[i], 0.75), "stroke-width": 5 * unit }));
        }
      });
      for (const hand of ["hand_left", "hand_right"]) {
        HAND_BONES.forEach(([a, b]) => {
          const [pa, pb] = [person[hand]?.[a], person[hand]?.[b]];
          if (isPresent(pa) && isPresent(pb)) {
            bones.append(svgEl("line", { x1: pa[0], y1: pa[1], x2: pb[0], y2: pb[1], "data-bone-of": p,
              class: "cs-pose-bone", stroke: "rgb(200, 200, 255)", "stroke-width": 2 * unit }));
          }
        });
      }
      for (const part of Object.keys(PARTS)) {
        (person[part] ?? []).forEach((point, i) => {
          if (!isPresent(point)) return;
          const key = pointKey(p, part, i);
          const fill = part === "body" ? rgb(COLORS[i]) : part === "face" ? "#fff" : "#36f";
          const radius = (part === "body" ? JOINT_RADIUS : JOINT_RADIUS * 0.6) * unit;
          const circle = svgEl("circle", { cx: point[0], cy: point[1], r: radius, fill, tabindex: 0,
            role: "button", class: `cs-pose-joint cs-pose-${part}`, "data-key": key, "data-person": p,
            "data-part": part, "data-index": i, "stroke-width": 2 * unit,
            "aria-label": `${pointName(part, i)} of person ${p + 1} at ${px(point[0])}, ${px(point[1])}` });
          if (key === selectedKey()) circle.classList.add("cs-pose-selected");
          points.append(circle);
        });
      }
    });
    if (focusedKey) {
      // the focused joint was drawn anew, or removed: keep the focus in the dialog
      const again = points.querySelector(`[data-key="${focusedKey}"]`);
      (again ?? dialog).focus({ preventScroll: true });
    }
  }

  function drawSide(frame, problems) {
    const s = state.selected;
    const children = [];
    if (s && frame.people[s.person]) {
      const point = frame.people[s.person][s.part]?.[s.index];
      children.push(el("p", { class: "cs-pose-selection", text: isPresent(point)
        ? `Person ${s.person + 1}, ${pointName(s.part, s.index)}: x ${px(point[0])}, y ${px(point[1])}`
        : `Person ${s.person + 1}, ${pointName(s.part, s.index)}: missing` }));
    } else {
      children.push(el("p", { text: frame.people.length ? "Select a joint." : "No person in the pose." }));
    }
    const person = frame.people[selectedPerson()];
    if (person) {
      const missing = BODY_NAMES.map((_, i) => i).filter((i) => !isPresent(person.body[i]));
      children.push(el("h3", { text: missing.length ? `Missing joints of person ${selectedPerson() + 1}`
        : `Person ${selectedPerson() + 1} has every body joint` }));
      children.push(el("div", { class: "cs-pose-missing" }, missing.map((i) => el("button", {
        type: "button", class: "cs-pose-button", "data-add": i, text: `+ ${BODY_NAMES[i]}`,
        title: `Add the ${BODY_NAMES[i]} near its neighbour`, onclick: () => addMissing(selectedPerson(), i),
      }))));
    }
    children.push(el("p", { class: "cs-pose-count", text: `${state.ops.length} edit${state.ops.length === 1 ? "" : "s"}` }));
    for (const problem of problems) children.push(el("p", { class: "cs-pose-problem", text: problem }));
    side.replaceChildren(...children);
  }

  return { close, element: dialog };
}
