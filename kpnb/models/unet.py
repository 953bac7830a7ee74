"""The conditional UNet of the latent diffusion model (the noise predictor) and its blocks.

:class:`UNet` is CompVis latent-diffusion's ``openaimodel.UNetModel`` rebuilt: ResBlocks that add a timestep
embedding, and :class:`SpatialTransformer` blocks (self-attention, cross-attention to the pose context, a
GEGLU MLP) at the downsample factors in ``UNetConfig.attn_ds``; the middle block always has attention.
Module names are ldm's own (``input_blocks.1.0.in_layers.2.weight``, ...), so the original project's
released weights load after stripping a prefix (:func:`unet_state_from_ldm`); ``UNetConfig.original()``
is that model's configuration. :mod:`kpnb.diffusion.ldm` wraps the UNet with the pose conditioning and the
noise schedule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from kpnb.models.vq import Upsample
from kpnb.poses.conditioning import fourier_features


@dataclass
class UNetConfig:
    """Shape of the UNet. ``attn_ds``: downsample factors with attention (ldm's ``attention_resolutions``):
    with a 16x16 latent, ``(2,)`` is attention at 8x8; the middle block always has attention.
    ``heads``: attention heads per layer (head width = channels / heads). ``context_dim``: width of the
    cross-attention context (None: no cross-attention, the transformer blocks only self-attend).
    ``self_attn=False`` drops the self-attention of the transformer blocks (cross-attention and MLP stay).
    ``pos_freqs`` > 0 adds a learned projection of Fourier features of each position's (x, y) (same basis
    as the ``tokens`` joint coordinates) to the transformer's input: without it the queries carry no
    position, and cross-attention cannot match "joint at (x, y)" to the place (0 = none, as ldm)."""

    in_channels: int = 3
    out_channels: int = 3
    base: int = 64
    mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attn_ds: tuple[int, ...] = (2,)
    heads: int = 4
    context_dim: int | None = None
    transformer_depth: int = 1
    self_attn: bool = True
    dropout: float = 0.0
    groups: int = 32
    pos_freqs: int = 0

    @classmethod
    def original(cls) -> "UNetConfig":
        """The original project's UNet (lxj616 danbooru-keypoints-ldm-vq-4.yaml)."""
        return cls(in_channels=3, out_channels=3, base=160, mults=(1, 2, 3, 4), num_res_blocks=2,
                   attn_ds=(2, 4, 8), heads=8, context_dim=17)

    def __post_init__(self) -> None:
        self.mults, self.attn_ds = tuple(self.mults), tuple(self.attn_ds)


def _norm(ch: int, groups: int, eps: float = 1e-5) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, ch), ch, eps=eps)


def _zero(m: nn.Module) -> nn.Module:
    """Zero-initialised output layers: every residual branch starts as the identity (as ldm)."""
    for p in m.parameters():
        nn.init.zeros_(p)
    return m


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [B, dim], ``cat(cos, sin)`` in ldm's order (needed for imported weights)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([args.cos(), args.sin()], -1)
    return F.pad(emb, (0, dim % 2))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, + timestep embedding, GroupNorm-SiLU-dropout-conv(zero), + skip."""

    def __init__(self, ch: int, emb_ch: int, out_ch: int, dropout: float, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(_norm(ch, groups), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, out_ch))
        self.out_layers = nn.Sequential(_norm(out_ch, groups), nn.SiLU(), nn.Dropout(dropout),
                                        _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1)))
        self.skip_connection = nn.Identity() if ch == out_ch else nn.Conv2d(ch, out_ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Attention(nn.Module):
    """Multi-head (cross-)attention through ``F.scaled_dot_product_attention`` (fused on CPU too, never
    materialising the full attention matrix in Python). ``context=None`` means self-attention."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        # One GEMM for q, k, v (self-attention) or for k, v (cross-attention) instead of three small ones;
        # the weights stay separate modules so that ldm checkpoints map 1:1.
        if context is None:
            w = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])
            q, k, v = F.linear(x, w).chunk(3, dim=-1)
        else:
            q = self.to_q(x)
            k, v = F.linear(context, torch.cat([self.to_k.weight, self.to_v.weight])).chunk(2, dim=-1)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-norm: self-attention, cross-attention to the pose context, GEGLU MLP (ldm's BasicTransformerBlock)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None, self_attn: bool, dropout: float):
        super().__init__()
        if self_attn:
            self.norm1, self.attn1 = nn.LayerNorm(dim), Attention(dim, heads, None, dropout)
        if context_dim is not None:
            self.norm2, self.attn2 = nn.LayerNorm(dim), Attention(dim, heads, context_dim, dropout)
        self.norm3, self.ff = nn.LayerNorm(dim), FeedForward(dim, dropout=dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        if hasattr(self, "attn1"):
            x = x + self.attn1(self.norm1(x))
        if hasattr(self, "attn2"):
            x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm, 1x1 conv in, transformer blocks over the h*w positions, 1x1 conv out (zero), + input."""

    def __init__(self, ch: int, heads: int, context_dim: int | None, depth: int, self_attn: bool,
                 dropout: float, groups: int, pos_freqs: int = 0):
        super().__init__()
        self.norm = _norm(ch, groups, eps=1e-6)
        self.proj_in = nn.Conv2d(ch, ch, 1)
        self.pos_freqs = pos_freqs
        if pos_freqs:
            self.pos_proj = nn.Linear(4 * pos_freqs + 2, ch)
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(ch, heads, context_dim, self_attn, dropout) for _ in range(depth)])
        self.proj_out = _zero(nn.Conv2d(ch, ch, 1))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        H, W = x.shape[-2:]
        h = rearrange(self.proj_in(self.norm(x)), "b c h w -> b (h w) c")
        if self.pos_freqs:
            c = (torch.arange(H, device=x.device, dtype=x.dtype) + 0.5) / H  # pixel centres, as skeleton maps
            yx = torch.stack(torch.meshgrid(c, (torch.arange(W, device=x.device, dtype=x.dtype) + 0.5) / W,
                                            indexing="ij"), -1).view(H * W, 2)
            xy = yx.flip(-1)
            h = h + self.pos_proj(torch.cat([xy, fourier_features(xy, self.pos_freqs)], -1))
        for blk in self.transformer_blocks:
            h = blk(h, context)
        return x + self.proj_out(rearrange(h, "b (h w) c -> b c h w", h=H, w=W))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Block(nn.Sequential):
    """A sequence of layers where ResBlocks also get the timestep embedding and transformers the context."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor,  # type: ignore[override]
                context: torch.Tensor | None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    """The noise predictor: ``unet(x [B, in, h, w], t [B], context [B, N, D] | None) -> eps [B, out, h, w]``.
    Layout and names as ldm's openaimodel.UNetModel (see the module docstring)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        c, g, dr = cfg.base, cfg.groups, cfg.dropout
        emb = 4 * c

        def attn(ch: int) -> SpatialTransformer:
            return SpatialTransformer(ch, cfg.heads, cfg.context_dim, cfg.transformer_depth, cfg.self_attn, dr, g,
                                      cfg.pos_freqs)

        self.time_embed = nn.Sequential(nn.Linear(c, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.input_blocks = nn.ModuleList([Block(nn.Conv2d(cfg.in_channels, c, 3, padding=1))])
        chans, ch, ds = [c], c, 1
        for level, mult in enumerate(cfg.mults):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb, mult * c, dr, g)]
                ch = mult * c
                if ds in cfg.attn_ds:
                    layers.append(attn(ch))
                self.input_blocks.append(Block(*layers))
                chans.append(ch)
            if level != len(cfg.mults) - 1:
                self.input_blocks.append(Block(Downsample(ch)))
                chans.append(ch)
                ds *= 2
        self.middle_block = Block(ResBlock(ch, emb, ch, dr, g), attn(ch), ResBlock(ch, emb, ch, dr, g))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.mults))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + chans.pop(), emb, mult * c, dr, g)]
                ch = mult * c
                if ds in cfg.attn_ds:
                    layers.append(attn(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(Block(*layers))
        self.out = nn.Sequential(_norm(ch, g), nn.SiLU(), _zero(nn.Conv2d(c, cfg.out_channels, 3, padding=1)))

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(t, self.cfg.base))
        hs = []
        h = x
        for blk in self.input_blocks:
            h = blk(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for blk in self.output_blocks:
            h = blk(torch.cat([h, hs.pop()], 1), emb, context)
        return self.out(h)


def unet_state_from_ldm(state: Mapping[str, torch.Tensor], ema: bool = True,
                        prefix: str = "model.diffusion_model.",
                        sources: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Map a CompVis latent-diffusion state dict (e.g. the original project's released checkpoint, read with
    :func:`kpnb.original.common.load_lightning_checkpoint`) to :class:`UNet` names. ``ema=True`` takes ldm's EMA
    copy (stored as ``model_ema.diffusion_model<name without dots>``) when present. ldm's
    self-attention-only blocks always exist, so load it into a UNet with ``self_attn=True`` and
    ``context_dim=17``. ``sources``, when given, is filled with {UNet name: the state dict key it came from}."""
    plain = {k[len(prefix):]: k for k in state if k.startswith(prefix)}
    if ema:
        ema_prefix = "model_ema." + prefix.split(".", 1)[1].rstrip(".")
        squashed = {k[len(ema_prefix):]: k for k in state if k.startswith(ema_prefix)}
        if squashed:
            undot: dict[str, str] = {}
            for k in plain:
                if undot.setdefault(k.replace(".", ""), k) != k:
                    raise KeyError(f"model weights {undot[k.replace('.', '')]!r} and {k!r} have the same EMA name")
            missing = [k for k in squashed if k not in undot]
            if missing:
                raise KeyError(f"EMA weights without a matching model weight: {missing[:5]}")
            chosen = {undot[k]: src for k, src in squashed.items()}
            if sources is not None:
                sources.update(chosen)
            return {k: state[src] for k, src in chosen.items()}
    if not plain:
        raise KeyError(f"no weights under {prefix!r} in this state dict")
    if sources is not None:
        sources.update(plain)
    return {k: state[src] for k, src in plain.items()}
