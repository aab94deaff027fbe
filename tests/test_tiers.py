"""The test tiers of conftest.py: the pure tier needs no ComfyUI, and a test that does something expensive
without its mark fails naming the mark."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, TIERS

from consistent_synthesis.runner import random_models, server


def test_the_pure_tier_is_collected_without_a_comfyui_host(tmp_path):
    """A pure test module that imports ComfyUI (directly or through a helper) fails to collect here."""
    env = {k: v for k, v in os.environ.items() if k != "CS_REQUIRE_HOST"} | {"COMFYUI_PATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-m", "pure", "--collect-only", "-q",
                           "-p", "no:cacheprovider", "tests"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "HOST TESTS SKIPPED" in out  # the host modules were left out, so no host was found
    collected = re.search(r"(\d+)/\d+ tests collected", out)
    assert collected and int(collected.group(1)) > 0, out[-2000:]


def test_the_tiers_are_the_registered_markers(pytestconfig):
    registered = {line.split(":")[0] for line in pytestconfig.getini("markers")}
    assert set(TIERS) | {"slow"} <= registered


def test_this_module_is_pure(request):
    assert request.node.get_closest_marker("pure") is not None
    assert [m for m in TIERS if request.node.get_closest_marker(m)] == ["pure"]


def test_starting_a_server_outside_the_server_tier_fails_naming_the_mark():
    with pytest.raises(pytest.fail.Exception, match=r"starts a ComfyUI server .*@pytest\.mark\.server"):
        server.LocalServer.start(None)


def test_a_full_size_stand_in_outside_the_slow_tier_fails_naming_the_mark(tmp_path):
    # a name with no stand-in: if the guard let it through, ensure would refuse it with a ValueError
    with pytest.raises(pytest.fail.Exception, match=r"full-size random stand-in .*@pytest\.mark\.slow"):
        random_models.ensure("vae", "no-such-model.safetensors", root=tmp_path)
