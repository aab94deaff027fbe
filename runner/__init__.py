"""Headless runner: post a workflow to ComfyUI (started here, or already running) and save its images.

    python -m runner masactrl_sd15 --smoke        # from the pack's folder
    python -m runner sweep masactrl_sd15 --vary start_step=0..10

See ``runner/cli.py`` and ``runner/sweep/command.py`` for the options; ``runner/random_models.py``
builds the random-weight stand-ins used when model files are missing.
"""
