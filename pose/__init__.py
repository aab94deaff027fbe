"""Pose data, drawing, completion, edits and detection for pose-edited outpainting (no ComfyUI import)."""
