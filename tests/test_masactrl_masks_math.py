"""Mask-guided MasaCtrl's masks per layer (attention/masactrl_masks.py): given masks resized once per
resolution and run, automatic masks from the recorded cross-attention maps, the run checks."""

import pytest
import torch

from consistent_synthesis.attention import masactrl as M
from consistent_synthesis.attention import masactrl_masks as MM
from consistent_synthesis.attention.layer_selection import LayerSelection, StepWindow

NODE = "MasaCtrlAttentionPatch"


def settings(**changes):
    values = dict(window=StepWindow(), selection=LayerSelection(), layers=(), source_index=0) | changes
    return M.MasaCtrlSettings(**values)


def test_given_masks_are_resized_nearest_once_per_resolution_and_reused():
    source = torch.zeros(1, 4, 4)
    source[:, :2, :2] = 1
    target = torch.zeros(2, 4, 4)
    target[0, 2:, 2:] = 1
    s, state = settings(source_mask=source, target_mask=target), MM.MaskState()
    src, tgt, (bias_fg, bias_bg) = MM.given_masks(s, state, 2, 2, torch.device("cpu"), torch.float32)
    assert src.tolist() == [1.0, 0.0, 0.0, 0.0]
    assert tgt.tolist() == [[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]]
    low = torch.finfo(torch.float32).min
    assert bias_fg.tolist() == [[0.0, low, low, low]] and bias_bg.tolist() == [[low, 0.0, 0.0, 0.0]]
    assert MM.given_masks(s, state, 2, 2, torch.device("cpu"), torch.float32)[0] is src  # kept for the run
    assert MM.given_masks(s, state, 4, 4, torch.device("cpu"), torch.float32)[0].shape == (16,)
    assert len(state.masks) == 2


def maps(source_hot: int, target_hot: int, rows=2, positions=4, tokens=3):
    """Head-averaged maps (rows, positions, tokens): token 1 of row 0 peaks at ``source_hot``, token 2 of
    the other rows at ``target_hot``."""
    out = torch.full((rows, positions, tokens), 0.1)
    out[0, source_hot, 1] = 0.9
    out[1:, target_hot, 2] = 0.9
    return out


def test_auto_masks_are_the_chosen_tokens_maps_thresholded_at_the_layer():
    s, state = settings(auto_mask=True, source_tokens=(1,), target_tokens=(2,), mask_threshold=0.5), MM.MaskState()
    sigmas = torch.tensor([1.0])
    assert MM.auto_masks(s, state, sigmas, (2, 2), (8, 8), torch.float32, NODE) is None  # nothing recorded yet
    state.add_maps(maps(0, 3), sigmas)
    source, target, _ = MM.auto_masks(s, state, sigmas, (2, 2), (8, 8), torch.float32, NODE)
    assert source.tolist() == [1.0, 0.0, 0.0, 0.0] and target.tolist() == [[0.0, 0.0, 0.0, 1.0]]
    up, _, _ = MM.auto_masks(s, state, sigmas, (4, 4), (8, 8), torch.float32, NODE)  # nearest to a 4x4 layer
    assert up.reshape(4, 4)[:2, :2].eq(1).all() and up.sum() == 4


def test_maps_average_over_the_layers_of_one_evaluation_and_never_carry_over():
    state, first, second = MM.MaskState(), torch.tensor([1.0]), torch.tensor([0.5])
    state.add_maps(torch.ones(2, 4, 3), first)
    state.add_maps(3 * torch.ones(2, 4, 3), first)
    assert state.maps(first).eq(2).all()
    assert state.maps(second) is None
    state.add_maps(torch.zeros(2, 4, 3), second)
    assert state.maps(second).eq(0).all() and state.maps(first) is None


def test_a_token_past_the_recorded_prompt_names_the_node_and_input():
    s, state = settings(auto_mask=True, source_tokens=(1,), target_tokens=(3,)), MM.MaskState()
    sigmas = torch.tensor([1.0])
    state.add_maps(maps(0, 3), sigmas)
    with pytest.raises(ValueError, match=r"^MasaCtrlAttentionPatch: input 'target_tokens': token indices \[3\] are "
                                         r"past the prompt, which has 3 tokens"):
        MM.auto_masks(s, state, sigmas, (2, 2), (8, 8), torch.float32, NODE)


@pytest.mark.parametrize("mask, latent, matches", [((64, 64), (8, 8), True), ((100, 102), (10, 10), True),
                                                   ((100, 103), (10, 10), False), ((512, 768), (64, 96), True),
                                                   ((768, 512), (64, 96), False)])
def test_a_mask_matches_the_latent_within_2_percent_of_its_aspect(mask, latent, matches):
    assert MM.aspect_matches(mask, latent) is matches


def test_token_lists_are_checked_against_each_rows_own_prompt_length():
    gen = torch.Generator().manual_seed(0)
    source, target = torch.randn(154, 8, generator=gen), torch.randn(77, 8, generator=gen)
    context = torch.stack([source, target.repeat(2, 1)])  # MasaCtrl Conditioning Batch: the target repeated
    with pytest.raises(ValueError, match=r"^MasaCtrlAttentionPatch: input 'target_tokens': token indices \[100\] "
                                         r"are past the target prompt of batch row 1 \(repeated to 154 tokens in "
                                         r"the batch\), which has 77 tokens"):
        MM.check_tokens_against_prompts(settings(source_tokens=(100,), target_tokens=(100,)), 3, [context], NODE)
    MM.check_tokens_against_prompts(settings(source_tokens=(153,), target_tokens=(76,)), 3, [context], NODE)
    with pytest.raises(ValueError, match="input 'source_tokens'"):
        MM.check_tokens_against_prompts(settings(source_tokens=(154,)), 3, [context], NODE)
    # rows the host maps to the batch its own way (3 prompts for 4 latents) are left to the maps' check
    MM.check_tokens_against_prompts(settings(target_tokens=(500,)), 4, [torch.randn(3, 77, 8)], NODE)
