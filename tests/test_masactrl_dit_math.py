"""The joint-attention form of MasaCtrl (attention/joint_attention.py), pure torch."""

import pytest
import torch

from consistent_synthesis.attention import joint_attention as J
from consistent_synthesis.attention import masactrl as M


def qkv(batch=6, heads=2, tokens=13, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, tokens, d, generator=gen) for _ in range(3))


@pytest.mark.parametrize("mode", J.MODES)
@pytest.mark.parametrize("chunks, source", [(1, 0), (2, 0), (2, 2), (1, 5)])
def test_equals_the_row_by_row_formula(mode, chunks, source):
    q, k, v = qkv()
    out = J.joint_mutual_attention(q, k, v, image_start=5, chunks=chunks, source_index=source, mode=mode)
    ref = J.reference_joint_attention(q, k, v, image_start=5, chunks=chunks, source_index=source, mode=mode)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


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
