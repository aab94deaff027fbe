"""Attention math for consistent synthesis (pure torch, no ComfyUI import)."""
