"""The conditional transformer baseline: a GPT over f16 VQ codes, conditioned on 17 pose tokens.

The original project compared its latent diffusion model with taming-transformers' conditional transformer
(``Net2NetTransformer``): a decoder-only GPT that reads the condition's tokens as a prefix and then predicts
the image's VQ code indices one by one in raster order. This module is that baseline, written small in the
spirit of minGPT / nanoGPT (pre-norm blocks, causal self-attention, GELU MLP, learned absolute positions).

Sequence layout (one per image)::

    [ p_0 .. p_16 | c_0 .. c_{L-1} ]      L = h * w codes of the f16 latent (4x4 = 16 at 64 px, 16x16 at 256 px)

Vocabulary: one embedding table with two disjoint ranges, so a pose token never shares an embedding with an
image code (the *own vocabulary* of the pose tokens):

* image codes ``0 .. n_codes-1`` (the VQ codebook indices);
* pose tokens ``n_codes + t`` with ``t`` from :func:`pose_tokens`: the original 32x32 grid cell of the joint
  (:func:`kpnb.poses.pose.grid_tokens`, ``faithful_axes=True``: the original's transposed order
  ``y_cell + 32 * x_cell``), or ``MISSING_TOKEN`` (1024) for a joint with no label, or ``OUTSIDE_TOKEN``
  (1025) for a joint outside the frame. ``grid_tokens`` alone would put both on a border cell (missing
  joints at (0, 0), outside joints clamped to the edge), which the model could not tell from a real joint
  there. Hidden (labelled, occluded) joints keep their cell.

The output head only covers the image codes, and the loss (teacher forcing, cross-entropy) is taken only at
the positions that predict image codes (the last prefix position predicts ``c_0``, ...): the model is never
asked to predict a pose. Training goes through :func:`kpnb.train.loop.train` (checkpoints, resume, NaN guard,
metrics.csv), sampling (:func:`sample_codes`) has temperature, top-k and top-p (nucleus) filtering, a
per-step callback or a tqdm bar, and is deterministic for a seed. Codes become images through the VQ
model's :meth:`kpnb.models.vq.VQModel.decode_indices`.

No key/value cache: every sampling step re-runs the sequence so far, as minGPT does. At 17 + 16 tokens
(``cpu``) that costs little; at 17 + 256 (``gpu``) a cache would save most of the sampling compute (not
done: kept small and readable).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from kpnb.core import progress as kprogress
from kpnb.core.images import to_uint8
from kpnb.core.settings import check_fields
from kpnb.poses.conditioning import check_poses, grid_context
from kpnb.poses.pose import GRID, MISSING, N_JOINTS, OUTSIDE

N_PREFIX = N_JOINTS                 # pose tokens before the image codes
MISSING_TOKEN = GRID * GRID         # 1024: a joint without a label
OUTSIDE_TOKEN = GRID * GRID + 1     # 1025: a labelled joint outside the frame
POSE_VOCAB = GRID * GRID + 2        # 1026 pose tokens


def pose_tokens(poses: Any) -> torch.Tensor:
    """Poses (anything :func:`kpnb.poses.conditioning.check_poses` takes) -> long ``[B, 17]`` in 0..1025: the
    original grid cell (faithful transposed order) of each joint, ``MISSING_TOKEN`` / ``OUTSIDE_TOKEN`` for
    missing / outside joints."""
    p = check_poses(poses)
    tok = grid_context(p)[:, 0].long()
    vis = p[..., 2]
    tok = torch.where(vis == MISSING, torch.full_like(tok, MISSING_TOKEN), tok)
    return torch.where(vis == OUTSIDE, torch.full_like(tok, OUTSIDE_TOKEN), tok)


# ======================================================================================================
# The model
# ======================================================================================================
@dataclass
class TransformerConfig:
    n_codes: int                        # image-code vocabulary (the VQ codebook size)
    latent_size: tuple[int, int]        # (h, w) of the code grid
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.latent_size = tuple(int(v) for v in self.latent_size)  # type: ignore[assignment]
        if self.n_embd % self.n_head:
            raise ValueError(f"TransformerConfig: n_embd {self.n_embd} is not a multiple of n_head {self.n_head}")
        if self.n_codes < 1 or len(self.latent_size) != 2 or min(self.latent_size) < 1:
            raise ValueError(f"TransformerConfig: bad n_codes {self.n_codes} or latent_size {self.latent_size}")

    @property
    def n_positions(self) -> int:
        """Image codes per sample."""
        return self.latent_size[0] * self.latent_size[1]

    @property
    def block_size(self) -> int:
        """Longest input: the prefix and all codes but the last (which is only ever a target)."""
        return N_PREFIX + self.n_positions - 1

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["latent_size"] = list(self.latent_size)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TransformerConfig":
        check_fields(cls, d)
        return cls(**dict(d))


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (rearrange(t, "b t (h d) -> b h t d", h=self.n_head) for t in self.c_attn(x).chunk(3, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_drop(self.c_proj(rearrange(y, "b h t d -> b t (h d)")))


class Block(nn.Module):
    """Pre-norm: x + attn(ln(x)), then x + mlp(ln(x))."""
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(cfg.n_embd), CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(),
                                 nn.Linear(4 * cfg.n_embd, cfg.n_embd), nn.Dropout(cfg.dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class CondTransformer(nn.Module):
    """``model(idx [B, T], start) -> logits [B, T - start, n_codes]``: next-image-code logits for input
    positions ``start..T-1`` (idx holds pose tokens already offset by ``n_codes``, then codes)."""
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.n_codes + POSE_VOCAB, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.n_codes, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by depth
            if name.endswith(("c_proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def config(self) -> dict[str, Any]:
        return self.cfg.to_dict()

    def forward(self, idx: torch.Tensor, start: int = 0) -> torch.Tensor:
        T = idx.shape[1]
        if T > self.cfg.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than the model's block size {self.cfg.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x[:, start:]))  # the head only where a prediction is wanted

    def sequence(self, ptok: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Pose tokens [B, 17] (0..1025) and codes [B, h, w] or [B, L] -> the full sequence [B, 17 + L]."""
        return torch.cat([ptok.long() + self.cfg.n_codes, codes.reshape(len(codes), -1).long()], 1)

    def loss(self, ptok: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced cross-entropy over the image codes only. The input is the sequence without its last
        code; logits are read from position 16 (the last pose token, which predicts c_0) onwards, so no
        prefix position enters the loss."""
        seq = self.sequence(ptok, codes)
        logits = self(seq[:, :-1], start=N_PREFIX - 1)  # [B, L, n_codes]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), seq[:, N_PREFIX:].reshape(-1))

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


ARCH_KEYS = ("n_layer", "n_head", "n_embd", "dropout")


def make_transformer(cfg: Mapping[str, Any], *, n_codes: int | None = None,
                     latent_size: tuple[int, int] | None = None) -> CondTransformer:
    """A CondTransformer from a preset's ``transformer`` section (its architecture keys) for a VQ model with ``n_codes`` codes and a code grid of ``latent_size``
    (either given here or present in ``cfg``, e.g. a saved model config)."""
    c = {k: cfg[k] for k in ARCH_KEYS}
    n_codes = cfg.get("n_codes") if n_codes is None else n_codes
    latent_size = cfg.get("latent_size") if latent_size is None else latent_size
    if n_codes is None or latent_size is None:
        raise ValueError("make_transformer: give n_codes and latent_size (the VQ model's codebook size and code grid)")
    return CondTransformer(TransformerConfig(n_codes=int(n_codes), latent_size=tuple(latent_size), **c))


@torch.no_grad()
def decode_codes(vq: nn.Module, codes: torch.Tensor) -> np.ndarray:
    """Code indices [B, h, w] -> uint8 images [B, H, W, 3] through :meth:`kpnb.models.vq.VQModel.decode_indices`."""
    dev = next(vq.parameters()).device
    x = vq.decode_indices(codes.to(dev).long())
    return to_uint8(x)


# ======================================================================================================
# Sampling
# ======================================================================================================
def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the ``top_k`` largest and outside the nucleus: the smallest set of
    tokens whose probabilities add up to at least ``top_p`` (the most likely token always stays).
    None (or top_k 0, top_p >= 1) leaves that filter off."""
    if top_k:
        kth = torch.topk(logits, min(int(top_k), logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop_sorted = probs.cumsum(-1) - probs >= top_p  # the mass before this token already reaches top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def sample_codes(model: CondTransformer, poses: Any, *, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | torch.Generator | None = None,
                 callback: Callable[[dict[str, Any]], None] | None = None, progress: bool = False
                 ) -> torch.Tensor:
    """Sample code indices [B, h, w] for ``poses``, one code at a time in raster order.

    * ``temperature`` divides the logits (0 = greedy: always the most likely code), then ``top_k`` and
      ``top_p`` filter them (:func:`filter_logits`).
    * determinism: draws come from ``seed``, a CPU ``torch.Generator`` or an int that seeds a fresh one
      (None = torch's global RNG), on the CPU, so a seed gives the same codes on any device.
    * ``callback(dict(i, codes))`` after each step (i = 0..L-1, ``codes`` [B, i + 1] so far), or
      ``progress=True`` for a tqdm bar."""

    ptok = pose_tokens(poses)
    dev = next(model.parameters()).device
    generator = seed if seed is None or isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    seq = ptok.to(dev) + model.cfg.n_codes
    L = model.cfg.n_positions
    # no progress-log lines unless asked: notebooks call this once per batch, a second each
    for i in kprogress.bar(range(L), desc="sampling codes", disable=not progress, leave=False, unit_label="code",
                           report=progress):
        logits = model(seq, start=seq.shape[1] - 1)[:, -1].float().cpu()
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=generator)
        seq = torch.cat([seq, nxt.to(dev)], 1)
        if callback is not None:
            callback({"i": i, "codes": seq[:, N_PREFIX:]})
    model.train(was_training)
    return seq[:, N_PREFIX:].reshape(-1, *model.cfg.latent_size).cpu()


def sample_images(model: CondTransformer, vq: nn.Module, poses: Any, *, batch_size: int = 50, seed: int = 0,
                  **kw: Any) -> np.ndarray:
    """Sample codes (keywords as :func:`sample_codes`) and decode them: uint8 [N, H, W, 3]. Batch k of
    ``batch_size`` poses uses ``seed + k``, so results do not depend on what else was sampled before."""
    poses = check_poses(poses)
    out = [decode_codes(vq, sample_codes(model, poses[i:i + batch_size], seed=seed + k, **kw))
           for k, i in enumerate(range(0, len(poses), batch_size))]
    return np.concatenate(out)
