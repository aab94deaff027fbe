// Pose editor for PoseEditOutpaint: a button on the node opens a dialog over the page that shows the
// last run's padded image with its skeleton; edits go into the node's `edits` widget, so they are
// saved with the workflow and sent with the prompt.

import { api } from "../../scripts/api.js";
import { app } from "../../scripts/app.js";
import { openPoseEditor } from "./pose_editor_dialog.js";

const NODE_TYPE = "PoseEditOutpaint";
const LAST_RUN = Symbol("consistent synthesis: last run of PoseEditOutpaint");

/** The image and pose of the node's last run: from its `executed` message, else from the outputs the
 * frontend keeps per node (both hold the UI output `images`, `pose_base`). */
function lastRun(node) {
  return runOf(node[LAST_RUN] ?? app.nodeOutputs?.[String(node.id)]);
}

function runOf(output) {
  const poseBase = output?.pose_base?.[0];
  return poseBase ? { image: output.images?.[0] ?? null, poseBase } : null;
}

/** The last run from the server's history, for a page that has not seen the node execute: after a
 * reload, or when the server answered a queued prompt from its cache (no `executed` message for this
 * node then). The newest entry whose prompt has this node id as a PoseEditOutpaint. */
async function lastRunFromHistory(node) {
  try {
    const response = await api.fetchApi("/history?max_items=64");
    if (!response.ok) return null;
    const entries = Object.values(await response.json());
    entries.sort((a, b) => (b.prompt?.[0] ?? 0) - (a.prompt?.[0] ?? 0)); // newest queue number first
    for (const entry of entries) {
      const id = String(node.id);
      if (entry.prompt?.[2]?.[id]?.class_type !== NODE_TYPE) continue;
      const run = runOf(entry.outputs?.[id]);
      if (run) return run;
    }
  } catch (e) {
    console.warn("Pose editor: could not read the history", e);
  }
  return null;
}

app.registerExtension({
  name: "consistent_synthesis.PoseEditor",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE_TYPE) return;

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      const button = this.addWidget("button", "edit pose", null, async () => {
        if (document.querySelector(".cs-pose-editor")) return; // one editor at a time
        await openPoseEditor({
          app,
          title: this.title,
          editsWidget: this.widgets?.find((w) => w.name === "edits"),
          run: lastRun(this) ?? (await lastRunFromHistory(this)),
          onChange: () => app.graph?.setDirtyCanvas(true, true),
        });
      });
      button.label = "Edit pose…";
      // A button holds no value: keep it out of widgets_values and of the API prompt.
      button.serialize = false;
      button.options = { ...(button.options ?? {}), serialize: false };
      return result;
    };

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      if (message?.pose_base) this[LAST_RUN] = message;
    };
  },
});
