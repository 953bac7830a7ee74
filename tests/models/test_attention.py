"""The attention blocks of the UNet, the VQ model and the code transformer against attention written out head by
head (softmax(q k^T / sqrt(d)) v), so the head split and merge (einops patterns) are pinned."""
import math

import torch

from kpnb.models import transformer, unet, vq


def attend(q, k, v, causal=False):
    """One head: q [N, d], k and v [M, d]."""
    w = q @ k.T / math.sqrt(q.shape[-1])
    if causal:
        w = w.masked_fill(torch.ones_like(w, dtype=torch.bool).triu(1), float("-inf"))
    return w.softmax(-1) @ v


def heads(q, k, v, n, causal=False):
    """[N, n * d] inputs, each head on its own slice of channels, outputs concatenated."""
    d = q.shape[-1] // n
    return torch.cat([attend(q[:, i * d:(i + 1) * d], k[:, i * d:(i + 1) * d], v[:, i * d:(i + 1) * d], causal)
                      for i in range(n)], -1)


def test_unet_attention_self_and_cross():
    torch.manual_seed(0)
    x, ctx = torch.randn(2, 10, 32), torch.randn(2, 5, 17)
    for a, c in ((unet.Attention(32, 4), None), (unet.Attention(32, 4, context_dim=17), ctx)):
        kv = x if c is None else c
        want = torch.stack([heads(a.to_q(x[b]), a.to_k(kv[b]), a.to_v(kv[b]), 4) for b in range(2)])
        torch.testing.assert_close(a(x, c), a.to_out(want), atol=1e-5, rtol=1e-5)


def test_spatial_transformer_treats_each_pixel_as_a_token():
    """The image [B, C, H, W] goes through the transformer as H*W tokens in raster order and comes back in place."""
    torch.manual_seed(0)
    st = unet.SpatialTransformer(16, 2, None, 1, True, 0.0, 8)
    torch.nn.init.normal_(st.proj_out.weight, std=0.1)
    x = torch.randn(2, 16, 3, 5)
    tokens = st.proj_in(st.norm(x)).permute(0, 2, 3, 1).reshape(2, 15, 16)
    h = st.transformer_blocks[0](tokens, None)
    torch.testing.assert_close(st(x, None), x + st.proj_out(h.reshape(2, 3, 5, 16).permute(0, 3, 1, 2)))


def test_vq_attention():
    torch.manual_seed(0)
    a = vq.Attention(32)
    torch.nn.init.normal_(a.out.weight, std=0.1)
    x = torch.randn(2, 32, 4, 5)
    qkv = a.qkv(a.norm(x))
    out = []
    for b in range(2):
        q, k, v = qkv[b].reshape(96, 20).T.chunk(3, -1)  # [HW, C] each, pixels in raster order
        out.append(attend(q, k, v).T.reshape(32, 4, 5))
    torch.testing.assert_close(a(x), x + a.out(torch.stack(out)), atol=1e-5, rtol=1e-5)


def test_causal_self_attention():
    torch.manual_seed(0)
    cfg = transformer.TransformerConfig(n_codes=16, latent_size=(3, 3), n_layer=1, n_head=2, n_embd=32)
    a = transformer.CausalSelfAttention(cfg).eval()
    x = torch.randn(2, 9, 32)
    qkv = a.c_attn(x)
    want = torch.stack([heads(*qkv[b].chunk(3, -1), 2, causal=True) for b in range(2)])
    torch.testing.assert_close(a(x), a.c_proj(want), atol=1e-5, rtol=1e-5)
