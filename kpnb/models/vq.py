"""VQGAN-style autoencoders (f4 / f8 / f16): encoder, vector quantiser, decoder, patch discriminator, training.

The layout follows taming-transformers / latent-diffusion (ResNet blocks with GroupNorm and swish, strided
downsampling, nearest-neighbour upsampling, attention only in the middle block), written small. The one
addition is ``stem``: a pixel-unshuffle (space-to-depth) of the input by ``stem`` before the first conv and
the matching pixel-shuffle after the last. ``stem=1`` is exactly the original layout (the ``gpu`` preset).

Design choices (their measurements: ``docs/experiments.md``):

* ``stem``: on a CPU, full-resolution layers dominate the cost; with a 4x4 stem every layer of the ``cpu`` f4
  runs at 16x16, and within a fixed time the cheapest model learns the most.
* ``linear_path``: a 1x1 conv from each factor x factor patch to its latent cell beside the encoder's deep
  path, and its mirror beside the decoder's, set to the patches' PCA on the first training batch
  (:meth:`VQModel.init_linear_path`) with the deep paths' last convs at zero: training starts at the best
  linear autoencoder instead of noise, and the deep paths learn the rest.
* ``code_groups``: product quantisation. C channels in G groups, each snapped to its own codebook of
  ``n_codes``, so a cell carries G x log2(n_codes) bits without an N x (huge codebook) distance matrix.

Both additions are off by default, so ``gpu`` and imported checkpoints keep the original layout. f16 keeps one
codebook: notebook 07's transformer predicts one code per cell.

Downsampling factor = ``stem * 2 ** (len(channel_mult) - 1)``.

Images are in [-1, 1] inside the model. ``encode(x)`` gives the continuous pre-quantisation latent ``h``
([B, latent_channels, H/f, W/f], what a latent diffusion model works in), ``quantize(h)`` snaps it to the
codebook (straight-through gradient), ``decode(zq)`` maps a quantised latent back to pixels.

Codebook health: the codebook is initialised from encoder outputs at the first training step, code usage is
tracked as a moving average, and codes that fall out of use are re-seeded from recent encoder outputs every
``reseed_every`` steps - the usual cure for dead codes (cf. Jukebox, "random restarts").
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from kpnb.core.images import to_model
from kpnb.core.settings import check_fields

SPECS = ("f4", "f8", "f16")


class VQConfigError(ValueError):
    """A VQ configuration that cannot be built (names the field)."""


@dataclass
class VQConfig:
    factor: int = 4                     # spatial downsampling: 4, 8 or 16
    image_size: int = 256
    latent_channels: int = 3
    n_codes: int = 8192
    base_width: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4)
    res_blocks: int = 2                 # per level in the encoder
    dec_res_blocks: int = 3             # per level in the decoder (taming: res_blocks + 1)
    stem: int = 1                       # pixel-unshuffle patch of the input (1 = the original layout)
    mid_attention: bool = True          # attention only in the middle block
    quant_conv: bool = False            # taming's 1x1 quant_conv / post_quant_conv around the codebook
    l2_codes: bool = False              # look up codes by cosine similarity (l2-normalised vectors)
    linear_path: bool = False           # a linear patch path beside the deep one, initialised by PCA (see
                                        # VQModel.init_linear_path); False = the original layout
    code_groups: int = 1                # product quantisation: the latent's channels in this many groups,
                                        # each snapped to its own codebook of n_codes (1 = plain VQ)
    beta: float = 0.25                  # commitment weight
    usage_decay: float = 0.99           # moving average of code usage
    dead_threshold: float = 0.03        # a code is dead below this fraction of the uniform usage rate

    def __post_init__(self) -> None:
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        got = self.stem * 2 ** (len(self.channel_mult) - 1)
        if got != self.factor:
            raise VQConfigError(f"VQConfig: stem {self.stem} and {len(self.channel_mult)} levels "
                                f"(channel_mult {self.channel_mult}) give factor {got}, not factor {self.factor}")
        if self.image_size % self.factor:
            raise VQConfigError(f"VQConfig: image_size {self.image_size} is not a multiple of factor {self.factor}")
        if self.code_groups < 1 or self.latent_channels % self.code_groups:
            raise VQConfigError(f"VQConfig: code_groups {self.code_groups} must divide latent_channels "
                                f"{self.latent_channels}")
        for name in ("latent_channels", "n_codes", "base_width", "res_blocks", "dec_res_blocks", "stem"):
            if getattr(self, name) < (0 if "res_blocks" in name else 1):
                raise VQConfigError(f"VQConfig: {name} must be positive, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VQConfig":
        check_fields(cls, d, VQConfigError)
        return cls(**dict(d))


# ---- building blocks ----------------------------------------------------------------------------------
def _norm(ch: int) -> nn.GroupNorm:
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if ch % g == 0 and ch // g >= 2 or g == 1)
    return nn.GroupNorm(groups, ch, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Single-head self-attention over all positions (only used at the lowest resolution)."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm, self.qkv, self.out = _norm(ch), nn.Conv2d(ch, 3 * ch, 1), nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(self.norm(x)), "b c h w -> b (h w) c").chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.out(rearrange(out, "b (h w) c -> b c h w", h=x.shape[-2]))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # taming's asymmetric pad keeps H/2 exactly


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(ch: int, attention: bool) -> nn.Sequential:
    return nn.Sequential(ResBlock(ch, ch), *([Attention(ch)] if attention else []), ResBlock(ch, ch))


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        widths = [cfg.base_width * m for m in cfg.channel_mult]
        self.stem = cfg.stem
        self.conv_in = nn.Conv2d(3 * cfg.stem ** 2, widths[0], 3, padding=1)
        layers: list[nn.Module] = []
        cin = widths[0]
        for i, w in enumerate(widths):
            for _ in range(cfg.res_blocks):
                layers.append(ResBlock(cin, w))
                cin = w
            if i < len(widths) - 1:
                layers.append(Downsample(cin))
        self.down = nn.Sequential(*layers)
        self.mid = _mid(cin, cfg.mid_attention)
        self.norm_out, self.conv_out = _norm(cin), nn.Conv2d(cin, cfg.latent_channels, 3, padding=1)
        self.factor = cfg.factor
        if cfg.linear_path:  # patch (factor x factor x 3) -> latent cell, linearly; the deep path adds to it
            self.linear = nn.Conv2d(3 * cfg.factor ** 2, cfg.latent_channels, 1)
            nn.init.zeros_(self.conv_out.weight), nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xin = x
        if self.stem > 1:
            x = F.pixel_unshuffle(x, self.stem)
        h = self.mid(self.down(self.conv_in(x)))
        h = self.conv_out(F.silu(self.norm_out(h)))
        if hasattr(self, "linear"):
            h = h + self.linear(F.pixel_unshuffle(xin, self.factor))
        return h


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        widths = [cfg.base_width * m for m in cfg.channel_mult]
        self.stem = cfg.stem
        cin = widths[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, cin, 3, padding=1)
        self.mid = _mid(cin, cfg.mid_attention)
        layers: list[nn.Module] = []
        for i in reversed(range(len(widths))):
            for _ in range(cfg.dec_res_blocks):
                layers.append(ResBlock(cin, widths[i]))
                cin = widths[i]
            if i > 0:
                layers.append(Upsample(cin))
        self.up = nn.Sequential(*layers)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, 3 * cfg.stem ** 2, 3, padding=1)  # its weight drives the GAN weight
        self.factor = cfg.factor
        if cfg.linear_path:
            self.linear = nn.Conv2d(cfg.latent_channels, 3 * cfg.factor ** 2, 1)
            nn.init.zeros_(self.conv_out.weight), nn.init.zeros_(self.conv_out.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        x = self.conv_out(F.silu(self.norm_out(h)))
        x = F.pixel_shuffle(x, self.stem) if self.stem > 1 else x
        if hasattr(self, "linear"):
            x = x + F.pixel_shuffle(self.linear(z), self.factor)
        return x


class VectorQuantizer(nn.Module):
    """Nearest-code lookup with the VQ-VAE codebook + commitment loss and a straight-through gradient, plus
    the bookkeeping against dead codes (initialisation from data, usage average, re-seeding).

    With ``code_groups`` G > 1 it is a product quantiser: the C latent channels split into G groups of C/G,
    each snapped to its own codebook of ``n_codes``, so a latent cell carries G x log2(n_codes) bits instead
    of log2(n_codes). ``codebook`` then holds the G codebooks one after the other (``[G * n_codes, C/G]``;
    G = 1 is the plain ``[n_codes, C]``), and a cell's indices are rows of it: ``[..., G]``, group g's in
    ``g * n_codes .. (g + 1) * n_codes - 1``."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        self.groups, self.group_dim = cfg.code_groups, cfg.latent_channels // cfg.code_groups
        self.n_rows = cfg.n_codes * self.groups
        self.codebook = nn.Parameter(torch.randn(self.n_rows, self.group_dim) / cfg.n_codes)
        self.register_buffer("usage", torch.full((self.n_rows,), 1.0 / cfg.n_codes))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def codes(self) -> torch.Tensor:
        return F.normalize(self.codebook, dim=1) if self.cfg.l2_codes else self.codebook

    def channel_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per latent channel, the min and max over the codes (``[C]`` each)."""
        e = self.codes().detach().view(self.groups, self.cfg.n_codes, self.group_dim)
        return e.amin(1).flatten(), e.amax(1).flatten()

    def _grouped(self, z: torch.Tensor) -> torch.Tensor:
        """Flat vectors [N, C] -> [N, G, C/G] (l2-normalised per group with ``l2_codes``)."""
        zg = z.view(len(z), self.groups, self.group_dim)
        return F.normalize(zg, dim=-1) if self.cfg.l2_codes else zg

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """Codebook rows nearest to flat vectors z [N, C]: [N] (one group) or [N, G]."""
        e = self.codes().view(self.groups, self.cfg.n_codes, self.group_dim)
        zg = self._grouped(z)
        if self.cfg.l2_codes:
            idx = torch.einsum("ngd,gkd->ngk", zg, e).argmax(-1)
        elif self.groups == 1:  # the plain case as one matrix product
            z1 = zg[:, 0]
            idx = (z1.pow(2).sum(1, keepdim=True) - 2 * z1 @ e[0].t() + e[0].pow(2).sum(1)[None]).argmin(1)[:, None]
        else:
            d = -2 * torch.einsum("ngd,gkd->ngk", zg, e) + e.pow(2).sum(-1)[None]
            idx = d.argmin(-1)
        idx = idx + torch.arange(self.groups, device=z.device) * self.cfg.n_codes
        return idx[:, 0] if self.groups == 1 else idx

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, c, hh, ww = h.shape
        z = h.permute(0, 2, 3, 1).reshape(-1, c)
        if self.training and not bool(self.initialized):
            self.init_from(z)
        z = self._grouped(z).reshape(-1, c)
        idx = self.lookup(z)
        zq = self.codes()[idx].reshape(-1, c)
        # codebook term pulls codes to the encoder outputs, commitment term keeps the encoder near its codes
        loss = F.mse_loss(zq, z.detach()) + self.cfg.beta * F.mse_loss(z, zq.detach())
        zq = z + (zq - z).detach()
        if self.training:
            with torch.no_grad():
                counts = torch.bincount(idx.flatten(), minlength=self.n_rows).float() / len(z)
                self.usage.lerp_(counts, 1 - self.cfg.usage_decay)
        zq = zq.reshape(b, hh, ww, c).permute(0, 3, 1, 2)
        shape = (b, hh, ww) if self.groups == 1 else (b, hh, ww, self.groups)
        return zq, idx.reshape(shape), loss

    @torch.no_grad()
    def init_from(self, z: torch.Tensor) -> None:
        """Codebook := random encoder outputs (with replacement when there are fewer than n_codes), plus a
        little noise so duplicates separate; each group's codes from that group's channels."""
        zg = z.view(len(z), self.groups, self.group_dim)
        pick = torch.randint(0, len(z), (self.groups, self.cfg.n_codes), device=z.device)
        rows = zg[pick, torch.arange(self.groups, device=z.device)[:, None]].reshape(self.n_rows, self.group_dim)
        self.codebook.copy_(rows + 0.01 * z.std() * torch.randn_like(rows))
        self.usage.fill_(1.0 / self.cfg.n_codes)
        self.initialized.fill_(True)

    @torch.no_grad()
    def reseed_dead(self, h: torch.Tensor) -> int:
        """Move codes used less than ``dead_threshold`` x the uniform rate onto random current encoder
        outputs (of their own group's channels); returns how many were moved."""
        dead = (self.usage < self.cfg.dead_threshold / self.cfg.n_codes).nonzero().flatten()
        if dead.numel() == 0:
            return 0
        zg = h.permute(0, 2, 3, 1).reshape(-1, self.groups, self.group_dim)
        pick = torch.randint(0, len(zg), (dead.numel(),), device=h.device)
        rows = zg[pick, dead // self.cfg.n_codes]
        self.codebook[dead] = rows + 0.01 * zg.std() * torch.randn_like(rows)
        self.usage[dead] = 1.0 / self.cfg.n_codes  # a grace period before it can be called dead again
        return int(dead.numel())


class VQModel(nn.Module):
    """Encoder, codebook, decoder. ``cfg.quant_conv`` adds taming's 1x1 convs: ``quant_conv`` after the
    encoder (part of ``encode``) and ``post_quant_conv`` before the decoder (part of ``decode``); kpnb's own
    models go without them, imported original checkpoints (:mod:`kpnb.original.ldm`) have them."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.quantizer, self.decoder = Encoder(cfg), VectorQuantizer(cfg), Decoder(cfg)
        if cfg.linear_path:
            self.register_buffer("linear_initialized", torch.zeros((), dtype=torch.bool))
        if cfg.quant_conv:
            self.quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
            self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    @torch.no_grad()
    def init_linear_path(self, x: torch.Tensor) -> None:
        """Set the linear path to the PCA of the (factor x factor x 3) patches of images x: the encoder
        projects a patch on its first ``latent_channels`` principal components, the decoder maps them back.
        With the deep paths' last convs at zero, training starts from the best linear autoencoder of
        patches instead of from noise, and the deep paths learn what is left. Done once, on the first training batch."""
        f, c = self.cfg.factor, self.cfg.latent_channels
        p = F.pixel_unshuffle(x.float(), f).permute(0, 2, 3, 1).reshape(-1, 3 * f * f).double()
        if len(p) < c:
            raise ValueError(f"init_linear_path: {len(p)} patches cannot give {c} principal components")
        mu = p.mean(0)
        _, _, vt = torch.linalg.svd(p - mu, full_matrices=False)
        v = vt[:c]                                                     # [C, 3 f^2]
        self.encoder.linear.weight.copy_(v[:, :, None, None].float())
        self.encoder.linear.bias.copy_((-v @ mu).float())
        self.decoder.linear.weight.copy_(v.t()[:, :, None, None].float())
        self.decoder.linear.bias.copy_(mu.float())
        self.linear_initialized.fill_(True)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images [-1, 1] [B, 3, H, W] -> continuous latent h [B, latent_channels, H/f, W/f]."""
        h = self.encoder(x)
        return self.quant_conv(h) if self.cfg.quant_conv else h

    def quantize(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h -> (zq (straight-through), code indices [B, H/f, W/f], codebook + commitment loss)."""
        return self.quantizer(h)

    def decode(self, zq: torch.Tensor) -> torch.Tensor:
        """Quantised latent -> images in [-1, 1] (not clamped). To decode a diffusion latent, quantize first."""
        return self.decoder(self.post_quant_conv(zq) if self.cfg.quant_conv else zq)

    def decode_indices(self, idx: torch.Tensor) -> torch.Tensor:
        """Code indices [B, h, w] (or [B, h, w, G] with code groups) -> images."""
        zq = self.quantizer.codes()[idx].reshape(*idx.shape[:3], -1).permute(0, 3, 1, 2)
        return self.decode(zq)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x -> (reconstruction, codebook loss, indices)."""
        zq, idx, qloss = self.quantize(self.encode(x))
        return self.decode(zq), qloss, idx


# ---- configs per spec ---------------------------------------------------------------------------------
# The gpu layouts are the latent-diffusion first stages (vq-f4 exactly: 3 channels, 8192 codes, width 128,
# mult 1,2,4, attention only in the middle, 256x256; f8/f16 by analogy with vq-f8 / vq-f16).
GPU_MODELS: dict[str, dict[str, Any]] = {
    "f4": dict(factor=4, latent_channels=3, n_codes=8192, base_width=128, channel_mult=(1, 2, 4), stem=1),
    "f8": dict(factor=8, latent_channels=4, n_codes=16384, base_width=128, channel_mult=(1, 2, 2, 4), stem=1),
    "f16": dict(factor=16, latent_channels=8, n_codes=16384, base_width=128, channel_mult=(1, 1, 2, 2, 4),
                stem=1),
}


def vq_config_for(spec: str, preset_cfg: Mapping[str, Any]) -> VQConfig:
    """The VQConfig of ``spec`` ("f4"/"f8"/"f16") under a preset's ``vq`` section: its ``models[spec]``
    fields on top of the defaults, with ``image_size`` from the section."""
    if spec not in SPECS:
        raise VQConfigError(f"unknown VQ spec {spec!r}; valid: {', '.join(SPECS)}")
    models = preset_cfg.get("models", {})
    if spec not in models:
        raise VQConfigError(f"vq.models has no entry for {spec!r} (has: {', '.join(models) or 'none'})")
    d = {"factor": int(spec[1:]), **dict(models[spec])}
    if "image_size" in preset_cfg:
        d["image_size"] = preset_cfg["image_size"]
    return VQConfig.from_dict(d)


# ---- training -----------------------------------------------------------------------------------------
def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1] (:func:`kpnb.core.images.to_model`)."""
    return to_model(images_uint8)
