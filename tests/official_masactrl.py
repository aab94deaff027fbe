"""An independent transcription of the official MasaCtrl ``MutualSelfAttentionControlMaskAuto``
(TencentARC/MasaCtrl, masactrl/masactrl.py) for ComfyUI UNets, as the test's reference.

It keeps the official code's own mechanics, not the pack's: steps and layers are counted by
attention calls (self and cross alternate; layer = call // 2; a step ends after every layer of
one UNet forward), cross-attention maps are kept for the 16 x 16 layers only, aggregated with
``aggregate_cross_attn_map`` (mean over layers, token columns summed, min-max normalised),
nearest-resized, binarised in place at ``thres``, and the target's foreground and background
branches are the source's attention with the dtype's minimum added to excluded keys. The batch
is put into the official order (unconditional rows, then conditional; source then target in
each) and back. Attention is computed with an additive key bias (as the official adds to its
logits), without the full logit matrix, so the test fits in memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _attention(q, k, v, heads, key_bias=None):
    b, n, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(t.shape[0], -1, heads, d).transpose(1, 2) for t in (q, k, v))
    mask = None if key_bias is None else key_bias.to(q.dtype).reshape(1, 1, 1, -1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(-1, n, inner)


def _probabilities(q, k, heads):
    b, n, inner = q.shape
    d = inner // heads
    qh, kh = (t.reshape(t.shape[0], -1, heads, d).transpose(1, 2) for t in (q, k))
    return ((qh @ kh.transpose(-1, -2)) * d ** -0.5).softmax(-1).mean(1)  # (b, n, m), heads averaged


class OfficialMaskAuto:
    def __init__(self, start_step=4, start_layer=10, total_steps=50, thres=0.1, ref_token_idx=(1,),
                 cur_token_idx=(1,), num_layers=16):
        self.step_idx = list(range(start_step, total_steps))
        self.layer_idx = list(range(start_layer, num_layers))
        self.num_att_layers = 2 * num_layers
        self.thres = thres
        self.ref_token_idx = list(ref_token_idx)
        self.cur_token_idx = list(cur_token_idx)
        self.cur_step = 0
        self.cur_att_layer = 0
        self.cross_attns = []
        self.self_attns_mask = None

    # AttentionBase.__call__: count the call, end the step after the last layer
    def _count(self):
        self.cur_att_layer += 1
        if self.cur_att_layer == self.num_att_layers:
            self.cur_att_layer = 0
            self.cur_step += 1
            self.cross_attns = []  # after_step

    def aggregate_cross_attn_map(self, idx):
        attn_map = torch.stack(self.cross_attns, dim=1).mean(1)
        res = int(attn_map.shape[-2] ** 0.5)
        image = attn_map.reshape(-1, res, res, attn_map.shape[-1])[..., idx].sum(-1)
        image_min = image.min(dim=1, keepdim=True)[0].min(dim=2, keepdim=True)[0]
        image_max = image.max(dim=1, keepdim=True)[0].max(dim=2, keepdim=True)[0]
        return (image - image_min) / (image_max - image_min)

    def _attn_batch(self, q, k, v, heads):
        """Official attn_batch for one row's queries over one row's K/V; doubled with a mask."""
        if self.self_attns_mask is None:
            return _attention(q, k, v, heads)
        mask = self.self_attns_mask
        mask[mask >= self.thres] = 1
        mask[mask < self.thres] = 0
        low = torch.finfo(q.dtype).min
        fg = _attention(q, k, v, heads, mask.masked_fill(mask == 0, low))
        bg = _attention(q, k, v, heads, mask.masked_fill(mask == 1, low))
        return torch.cat([fg, bg])

    def cross(self, q, k, v, heads):
        """An attn2 call in official batch order: record the 16 x 16 maps, plain attention."""
        if q.shape[1] == 16 * 16:
            self.cross_attns.append(_probabilities(q, k, heads))
        out = _attention(q, k, v, heads)
        self._count()
        return out

    def self_attention(self, q, k, v, heads):
        """An attn1 call in official batch order [u_src, u_tgt, c_src, c_tgt]."""
        if self.cur_step not in self.step_idx or self.cur_att_layer // 2 not in self.layer_idx:
            out = _attention(q, k, v, heads)
            self._count()
            return out
        qu, qc = q.chunk(2)
        ku, kc = k.chunk(2)
        vu, vc = v.chunk(2)
        out_u_source = self._attn_batch(qu[:1], ku[:1], vu[:1], heads)
        out_c_source = self._attn_batch(qc[:1], kc[:1], vc[:1], heads)
        res = int(q.shape[1] ** 0.5)
        if len(self.cross_attns) == 0:
            self.self_attns_mask = None
        else:
            mask_source = self.aggregate_cross_attn_map(self.ref_token_idx)[-2]
            self.self_attns_mask = F.interpolate(mask_source[None, None], (res, res)).flatten()
        out_u_target = self._attn_batch(qu[-1:], ku[:1], vu[:1], heads)
        out_c_target = self._attn_batch(qc[-1:], kc[:1], vc[:1], heads)
        if self.self_attns_mask is not None:
            mask_target = self.aggregate_cross_attn_map(self.cur_token_idx)[-1]
            spatial_mask = F.interpolate(mask_target[None, None], (res, res)).reshape(-1, 1)
            spatial_mask[spatial_mask >= self.thres] = 1
            spatial_mask[spatial_mask < self.thres] = 0
            fg, bg = out_u_target.chunk(2)
            out_u_target = fg * spatial_mask + bg * (1 - spatial_mask)
            fg, bg = out_c_target.chunk(2)
            out_c_target = fg * spatial_mask + bg * (1 - spatial_mask)
            self.self_attns_mask = None
        out = torch.cat([out_u_source, out_u_target, out_c_source, out_c_target], dim=0)
        self._count()
        return out


def _official_order(cond_or_uncond: list[int], batch: int) -> torch.Tensor:
    """Row permutation from the host's chunk order to the official [uncond rows, cond rows]."""
    per_chunk = batch // len(cond_or_uncond)
    order = sorted(range(len(cond_or_uncond)), key=lambda c: -cond_or_uncond[c])  # uncond (1) first
    return torch.cat([torch.arange(c * per_chunk, (c + 1) * per_chunk) for c in order])


def patch(model, editor: OfficialMaskAuto, layer_keys):
    """A clone of ``model`` whose every attn1/attn2 runs through ``editor`` in official order."""
    patched = model.clone()

    def wrap(fn):
        def replacement(q, k, v, extra_options):
            perm = _official_order(extra_options["cond_or_uncond"], q.shape[0])
            out = fn(q[perm], k[perm], v[perm], extra_options["n_heads"])
            restored = torch.empty_like(out)
            restored[perm] = out
            return restored
        return replacement

    for key in layer_keys:
        patched.set_model_attn1_replace(wrap(editor.self_attention), *key)
        patched.set_model_attn2_replace(wrap(editor.cross), *key)
    return patched
