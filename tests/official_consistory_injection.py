"""A transcription of the official ConsiStory feature injection (NVlabs/consistory), the tests' reference.

Written from ``utils/general_utils.py`` (``gaussian_smooth``, ``cos_dist``, ``gen_nn_map``,
``cyclic_nn_map``, ``anchor_nn_map``, ``get_dynamic_threshold``) and ``consistory_utils.py``
(``FeatureInjector.inject_outputs`` and, for cached anchors, ``inject_anchors``, with
``swap_strategy='min'``, ``dist_thr='dynamic'``), keeping
their mechanics, not the pack's: a Python loop over image pairs, boolean indexing, skimage's Otsu on
the host, and the in-place update through ``old_output = output`` (its ``.clone()`` commented out).
Only what the official code reads from ``self`` is passed as arguments; grids are square (``res``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from skimage import filters


def get_dynamic_threshold(tensor):
    return filters.threshold_otsu(tensor.cpu().numpy())


def gaussian_smooth(input_tensor, kernel_size=3, sigma=1):
    """One image's features ``(channels, h, w)``, each 2D slice smoothed."""
    kernel = np.fromfunction(
        lambda x, y: (1 / (2 * np.pi * sigma ** 2))
        * np.exp(-((x - (kernel_size - 1) / 2) ** 2 + (y - (kernel_size - 1) / 2) ** 2) / (2 * sigma ** 2)),
        (kernel_size, kernel_size))
    kernel = torch.Tensor(kernel / kernel.sum()).to(input_tensor.dtype).to(input_tensor.device)
    kernel = kernel.unsqueeze(0).unsqueeze(0)
    smoothed_slices = []
    for i in range(input_tensor.size(0)):
        slice_tensor = input_tensor[i, :, :]
        slice_tensor = F.conv2d(slice_tensor.unsqueeze(0).unsqueeze(0), kernel, padding=kernel_size // 2)[0, 0]
        smoothed_slices.append(slice_tensor)
    return torch.stack(smoothed_slices, dim=0)


def cos_dist(a, b):
    a_norm = F.normalize(a, dim=-1)
    b_norm = F.normalize(b, dim=-1)
    return 1 - a_norm @ b_norm.T


def gen_nn_map(src_features, src_mask, tgt_features, tgt_mask, device, batch_size=100, tgt_size=768):
    resized_src_features = F.interpolate(src_features.unsqueeze(0), size=tgt_size, mode='bilinear',
                                         align_corners=False).squeeze(0)
    resized_src_features = resized_src_features.permute(1, 2, 0).reshape(tgt_size ** 2, -1)
    resized_tgt_features = F.interpolate(tgt_features.unsqueeze(0), size=tgt_size, mode='bilinear',
                                         align_corners=False).squeeze(0)
    resized_tgt_features = resized_tgt_features.permute(1, 2, 0).reshape(tgt_size ** 2, -1)
    nearest_neighbor_indices = torch.zeros(tgt_size ** 2, dtype=torch.long, device=device)
    nearest_neighbor_distances = torch.zeros(tgt_size ** 2, dtype=src_features.dtype, device=device)
    if not batch_size:
        batch_size = tgt_size ** 2
    for i in range(0, tgt_size ** 2, batch_size):
        distances = cos_dist(resized_src_features, resized_tgt_features[i:i + batch_size])
        distances[~src_mask] = 2.
        min_distances, min_indices = torch.min(distances, dim=0)
        nearest_neighbor_indices[i:i + batch_size] = min_indices
        nearest_neighbor_distances[i:i + batch_size] = min_distances
    return nearest_neighbor_indices, nearest_neighbor_distances


def cyclic_nn_map(features, masks, latent_resolutions, device):
    bsz = features.shape[0]
    nn_map_dict = {}
    nn_distances_dict = {}
    for tgt_size in latent_resolutions:
        nn_map = torch.empty(bsz, bsz, tgt_size ** 2, dtype=torch.long, device=device)
        nn_distances = torch.full((bsz, bsz, tgt_size ** 2), float('inf'), dtype=features.dtype, device=device)
        for i in range(bsz):
            for j in range(bsz):
                if i != j:
                    nearest_neighbor_indices, nearest_neighbor_distances = gen_nn_map(
                        features[j], masks[tgt_size][j], features[i], masks[tgt_size][i], device,
                        batch_size=None, tgt_size=tgt_size)
                    nn_map[i, j] = nearest_neighbor_indices
                    nn_distances[i, j] = nearest_neighbor_distances
        nn_map_dict[tgt_size] = nn_map
        nn_distances_dict[tgt_size] = nn_distances
    return nn_map_dict, nn_distances_dict


def create_anchor_mapping(bsz, anchor_indices=(0,)):
    anchor_mapping = torch.eye(bsz, dtype=torch.bool)
    for anchor_idx in anchor_indices:
        anchor_mapping[:, anchor_idx] = True
    return anchor_mapping


def inject_outputs(output, curr_iter, output_res, extended_mapping, nn_map, nn_distances, attn_masks,
                   inject_range_alpha):
    """``FeatureInjector.inject_outputs`` ('min', 'dynamic'); ``nn_map`` etc. are the dicts by resolution.
    Modifies ``output`` in place and returns it, as the official code."""
    bsz = output.shape[0]
    nn_map = nn_map[output_res]
    nn_distances = nn_distances[output_res]
    attn_masks = attn_masks[output_res]
    vector_dim = output_res ** 2
    alpha = next((alpha for min_range, max_range, alpha in inject_range_alpha
                  if min_range <= curr_iter <= max_range), None)
    if alpha:
        old_output = output
        for i in range(bsz):
            curr_mapping = extended_mapping[i]
            if not torch.any(torch.cat([curr_mapping[:i], curr_mapping[i + 1:]])):
                continue
            min_dists = nn_distances[i][curr_mapping].argmin(dim=0)
            curr_nn_map = nn_map[i][curr_mapping][min_dists, torch.arange(vector_dim)]
            curr_nn_distances = nn_distances[i][curr_mapping][min_dists, torch.arange(vector_dim)]
            dist_thr = get_dynamic_threshold(curr_nn_distances)
            dist_mask = curr_nn_distances < dist_thr
            final_mask_tgt = attn_masks[i] & dist_mask
            other_outputs = old_output[curr_mapping][min_dists, curr_nn_map][final_mask_tgt]
            output[i][final_mask_tgt] = alpha * other_outputs + (1 - alpha) * old_output[i][final_mask_tgt]
    return output


def anchor_nn_map(features, anchor_features, masks, anchor_masks, latent_resolutions, device):
    """``utils/general_utils.anchor_nn_map``: new images (targets) to cached anchors (sources)."""
    bsz = features.shape[0]
    anchor_bsz = anchor_features.shape[0]
    nn_map_dict = {}
    nn_distances_dict = {}
    for tgt_size in latent_resolutions:
        nn_map = torch.empty(bsz, anchor_bsz, tgt_size ** 2, dtype=torch.long, device=device)
        nn_distances = torch.full((bsz, anchor_bsz, tgt_size ** 2), float('inf'), dtype=features.dtype, device=device)
        for i in range(bsz):
            for j in range(anchor_bsz):
                nearest_neighbor_indices, nearest_neighbor_distances = gen_nn_map(
                    anchor_features[j], anchor_masks[tgt_size][j], features[i], masks[tgt_size][i], device,
                    batch_size=None, tgt_size=tgt_size)
                nn_map[i, j] = nearest_neighbor_indices
                nn_distances[i, j] = nearest_neighbor_distances
        nn_map_dict[tgt_size] = nn_map
        nn_distances_dict[tgt_size] = nn_distances
    return nn_map_dict, nn_distances_dict


def inject_anchors(output, curr_iter, output_res, nn_map, nn_distances, attn_masks, inject_range_alpha,
                   anchor_outputs):
    """``FeatureInjector.inject_anchors`` ('min', 'dynamic'); ``anchor_outputs`` is
    ``anchors_cache.h_out_cache[place_in_unet][curr_iter]``, ``(anchors, tokens, channels)``."""
    bsz = output.shape[0]
    nn_map = nn_map[output_res]
    nn_distances = nn_distances[output_res]
    attn_masks = attn_masks[output_res]
    vector_dim = output_res ** 2
    alpha = next((alpha for min_range, max_range, alpha in inject_range_alpha
                  if min_range <= curr_iter <= max_range), None)
    if alpha:
        old_output = output
        for i in range(bsz):
            min_dists = nn_distances[i].argmin(dim=0)
            curr_nn_map = nn_map[i][min_dists, torch.arange(vector_dim)]
            curr_nn_distances = nn_distances[i][min_dists, torch.arange(vector_dim)]
            dist_thr = get_dynamic_threshold(curr_nn_distances)
            dist_mask = curr_nn_distances < dist_thr
            final_mask_tgt = attn_masks[i] & dist_mask
            other_outputs = anchor_outputs[min_dists, curr_nn_map][final_mask_tgt]
            output[i][final_mask_tgt] = alpha * other_outputs + (1 - alpha) * old_output[i][final_mask_tgt]
    return output
