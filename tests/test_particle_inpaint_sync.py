"""The particle sampler reads nothing back from the device per step beyond what the stock sampler does.

Counted on the CPU with testing/sync_counter.py, as tests/test_repaint_sync.py counts RePaint, with a
stand-in UNet (``0.5 * x``) so the counts are those of the sampling machinery.
"""

import pytest
import torch

from conftest import require_host

require_host()

import comfy.model_base  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402

import tiny_models as tm  # noqa: E402
from sync_counter import HostSyncCounter  # noqa: E402
from consistent_synthesis.nodes.particle_inpaint import ParticleInpaint  # noqa: E402
from consistent_synthesis.samplers import particle_inpaint as P  # noqa: E402

MT = comfy.model_base.ModelType


class StandInUNet(torch.nn.Module):
    dtype = torch.float32

    def forward(self, x, timesteps, context=None, control=None, transformer_options={}, **kwargs):
        return 0.5 * x


def syncs(model, sampler, steps):
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "karras", steps)
    samples = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., 4:] = 1.0
    noise = comfy.sample.prepare_noise(samples, 1)
    with HostSyncCounter() as counter:
        comfy.sample.sample_custom(model, noise, 3.0, sampler, sigmas, tm.conditioning("sd15"),
                                   tm.conditioning("sd15", seed=1), samples, noise_mask=mask, disable_pbar=True,
                                   seed=1)
    return counter


@pytest.mark.parametrize("model_type", [MT.EPS, MT.FLOW])
def test_particles_add_no_sync_per_step_over_the_stock_ancestral_sampler(model_type, measured):
    model = tm.tiny_model("sd15", model_type=model_type)
    model.model.diffusion_model = StandInUNet()
    stock = {n: syncs(model, comfy.samplers.sampler_object("euler_ancestral"), n).total for n in (6, 12)}
    ours = {}
    for n in (6, 12):
        counter = syncs(model, ParticleInpaint(P.Settings(4, 0.9, float("inf")), 0), n)
        ours[n] = counter.total
        measured(f"{model_type.name} {n} steps: stock euler_ancestral {stock[n]}, particles (4, resampling on) "
                 f"{ours[n]} ({counter.report(4) or 'none'})")
    per_step_stock = (stock[12] - stock[6]) / 6
    per_step_ours = (ours[12] - ours[6]) / 6
    assert per_step_ours <= per_step_stock, (ours, stock)
    assert ours[12] - stock[12] <= 2
