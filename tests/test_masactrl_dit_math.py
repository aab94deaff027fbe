"""The joint-attention form of MasaCtrl (attention/joint_attention.py), pure torch."""

import pytest
import torch

from consistent_synthesis.attention import joint_attention as J
from consistent_synthesis.attention import masactrl as M


def qkv(batch=6, heads=2, tokens=13, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, tokens, d, generator=gen) for _ in range(3))


def row_by_row(q, k, v, image_start, chunks, source, mode):
    """Joint MasaCtrl written out one row at a time with the logits materialized (independent of the pack):
    a target row keeps its own text keys (its own image keys too in union) and takes the source's image keys."""
    batch, heads, tokens, d = q.shape
    per_chunk = batch // chunks
    rows = []
    for b in range(batch):
        src = (b // per_chunk) * per_chunk + source
        if b == src:
            kb, vb = k[b], v[b]
        else:
            own = image_start if mode == "mutual" else tokens
            kb = torch.cat([k[b, :, :own], k[src, :, image_start:]], dim=1)
            vb = torch.cat([v[b, :, :own], v[src, :, image_start:]], dim=1)
        weights = (q[b].double() @ kb.double().transpose(-1, -2) * d ** -0.5).softmax(-1)
        rows.append((weights @ vb.double()).transpose(0, 1).reshape(tokens, heads * d))
    return torch.stack(rows).float()


@pytest.mark.parametrize("mode", J.MODES)
@pytest.mark.parametrize("chunks, source", [(1, 0), (2, 0), (2, 2), (1, 5)])
def test_equals_the_row_by_row_formula(mode, chunks, source):
    q, k, v = qkv()
    out = J.joint_mutual_attention(q, k, v, image_start=5, chunks=chunks, source_index=source, mode=mode)
    torch.testing.assert_close(out, row_by_row(q, k, v, 5, chunks, source, mode), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", J.MODES)
def test_the_source_rows_keep_plain_joint_attention(mode):
    q, k, v = qkv()
    out = J.joint_mutual_attention(q, k, v, image_start=5, chunks=2, source_index=1, mode=mode)
    plain = J.sdpa_attention(q, k, v)
    torch.testing.assert_close(out[[1, 4]], plain[[1, 4]], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(out[[0, 2, 3, 5]], plain[[0, 2, 3, 5]], atol=1e-3)


def test_target_text_keys_are_its_own():
    """Changing the source's text keys and values leaves every target untouched (mutual)."""
    q, k, v = qkv(batch=3)
    out = J.joint_mutual_attention(q, k, v, image_start=5, chunks=1)
    k2, v2 = k.clone(), v.clone()
    k2[0, :, :5] += 1
    v2[0, :, :5] -= 1
    out2 = J.joint_mutual_attention(q, k2, v2, image_start=5, chunks=1)
    assert torch.equal(out[1:], out2[1:])


@pytest.mark.parametrize("mode", J.MODES)
def test_without_text_it_is_the_unet_form(mode):
    q, k, v = qkv(batch=4, tokens=9)
    out = J.joint_mutual_attention(q, k, v, image_start=0, chunks=2, source_index=0, mode=mode)
    flat = [t.transpose(1, 2).flatten(2) for t in (q, k, v)]
    unet = M.mutual_self_attention(*flat, 2, chunks=2, source_index=0, mode=mode)
    torch.testing.assert_close(out, unet, rtol=1e-5, atol=1e-5)


def test_bad_batches_are_refused():
    q, k, v = qkv(batch=3)
    with pytest.raises(ValueError, match="cannot be split"):
        J.joint_mutual_attention(q, k, v, image_start=5, chunks=2)
    with pytest.raises(ValueError, match="outside a latent batch"):
        J.joint_mutual_attention(q, k, v, image_start=5, chunks=1, source_index=3)
    with pytest.raises(ValueError, match="mode must be"):
        J.joint_mutual_attention(q, k, v, image_start=5, chunks=1, mode="swap")
