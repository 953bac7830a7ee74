"""Import the original project's released checkpoints into kpnb's models.

The original project released two PyTorch Lightning checkpoints (``.ckpt``: a pickle plus tensor storages):

* the **VQGAN f4** trained on Danbooru with taming-transformers (``custom_vqgan``: embed_dim 3, n_embed 8192,
  ch 128, ch_mult 1,2,4, num_res_blocks 2, attn_resolutions [] so attention only in the middle block,
  resolution 256, z_channels 3, double_z false) -> :func:`load_original_vq` gives a :class:`kpnb.models.vq.VQModel`;
* the **keypoint latent-diffusion model** (CompVis latent-diffusion, ``danbooru-keypoints-ldm-vq-4.yaml``:
  UNet base 160, mults 1,2,3,4, attention at ds 2,4,8, 8 heads, context_dim 17, transformer depth 1; the VQGAN
  inside as ``first_stage_model``) -> :func:`load_original_ldm` gives ``(KeypointLDM, VQModel)``.

Nothing is downloaded. Put the files where you like - ``data/checkpoints/`` is the suggested place (``*.ckpt``
is git-ignored) - and pass the path::

    from kpnb import original
    vq = original.load_original_vq("data/checkpoints/original_vq_f4.ckpt")
    ldm, vq = original.load_original_ldm("data/checkpoints/original_ldm_keypoints.ckpt")
    print(ldm.import_report)          # keys mapped / left over / missing, schedule and scale_factor checks

A missing file raises :class:`FileNotFoundError` saying what to download and where to put it. The file is
read by :func:`kpnb.original.lightning.read_lightning_checkpoint`, which refuses any pickle that would import or
call something other than tensors, plain containers and (inert placeholders for) Lightning's metadata.

**Key mapping.** The UNet's module names are ldm's own (``model.diffusion_model.`` stripped, EMA names
un-squashed by :func:`kpnb.models.unet.unet_state_from_ldm`). The VQ model's names differ from taming's, so
:func:`vq_key_map` spells out, for every tensor of a kpnb :class:`~kpnb.models.vq.VQModel`, the original key(s) it
comes from: renames (``encoder.down.{level}.block.{j}`` -> ``encoder.down.{position}``, ``nin_shortcut`` ->
``skip``, ``mid.block_1``/``attn_1``/``block_2`` -> ``mid.0``/``1``/``2``, ``proj_out`` -> ``out``,
``quantize.embedding.weight`` -> ``quantizer.codebook``, the decoder's ``up.{level}`` counted from the top) and
one concatenation (attention ``q``, ``k``, ``v`` 1x1 convs -> kpnb's fused ``qkv``). :func:`vq_state_to_original`
is the inverse. taming's ``quant_conv``/``post_quant_conv`` are kept as such (``VQConfig(quant_conv=True)``).
:func:`save_original_ldm` writes a kpnb ``grid`` model and its VQ in the released checkpoint's layout (what the
tests feed ``kpnb sample`` and notebook 05 as "the released model").

**What cannot be represented** (a clear :class:`CheckpointImportError` instead of a silently different
model): attention inside the encoder/decoder levels (non-empty ``attn_resolutions``); ``double_z`` or
``z_channels != embed_dim``; VQ widths where kpnb's GroupNorm would not use taming's 32 groups (below 64
channels); a noise schedule other than ldm's "linear" (linear in sqrt(beta)); a UNet whose context is not the
17 keypoint tokens. Not reproduced but harmless for inference: taming's quantiser puts ``beta`` on the
codebook term (its "legacy" loss), kpnb on the commitment term - only training differs.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Mapping

import torch

from kpnb.diffusion.ldm import KeypointLDM
from kpnb.diffusion.schedule import Schedule
from kpnb.models.unet import UNetConfig, unet_state_from_ldm
from kpnb.models.vq import VQConfig, VQModel
from kpnb.original.common import ImportReport, check_missing, copy_into, load_lightning_checkpoint
from kpnb.original.lightning import (
    CheckpointImportError,
)
from kpnb.original.vq import vq_config_from_state, vq_from_state, vq_state_to_original, vq_training_only
from kpnb.poses.conditioning import N_JOINTS, PoseConditioner

# ======================================================================================================
# The latent-diffusion keypoint model
# ======================================================================================================
SCHEDULE_KEYS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                 "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                 "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                 "posterior_mean_coef1", "posterior_mean_coef2", "lvlb_weights")


def unet_config_from_state(u: Mapping[str, torch.Tensor], *, heads: int = 8) -> UNetConfig:
    """The :class:`kpnb.models.unet.UNetConfig` of an ldm ``openaimodel.UNetModel`` state dict (UNet names, no
    prefix), read from the shapes: base, in/out channels, mults, res blocks per level, attention levels,
    context width, transformer depth. ``heads`` does not show in the weights (the original: 8)."""
    if "input_blocks.0.0.weight" not in u or "out.2.weight" not in u:
        raise CheckpointImportError("not an ldm UNet state dict (no input_blocks.0.0.weight / out.2.weight)")
    base, in_ch = u["input_blocks.0.0.weight"].shape[:2]
    n_in = 1 + max(int(k.split(".")[1]) for k in u if k.startswith("input_blocks."))
    levels: list[list[tuple[int, bool]]] = [[]]
    for n in range(1, n_in):
        if f"input_blocks.{n}.0.op.weight" in u:
            levels.append([])
        elif f"input_blocks.{n}.0.in_layers.2.weight" in u:
            levels[-1].append((u[f"input_blocks.{n}.0.in_layers.2.weight"].shape[0],
                               f"input_blocks.{n}.1.norm.weight" in u))
        else:
            raise CheckpointImportError(f"input_blocks.{n}: neither a ResBlock nor a Downsample (resblock_updown?)")
    nrb = {len(lv) for lv in levels}
    uneven = len(nrb) != 1 or 0 in nrb or any(len({a for _, a in lv}) != 1 for lv in levels)
    if uneven:
        raise CheckpointImportError(f"uneven UNet levels (width, attention) {levels}: kpnb needs the same "
                                    f"number of blocks at every level and attention on all or none of a level")
    mults = []
    for lv in levels:
        if lv[0][0] % base:
            raise CheckpointImportError(f"UNet width {lv[0][0]} is not a multiple of the base {base}")
        mults.append(lv[0][0] // base)
    attn_ds = tuple(2 ** i for i, lv in enumerate(levels) if lv[0][1])
    to_k = [k for k in u if k.endswith("transformer_blocks.0.attn2.to_k.weight")]
    if not to_k:
        raise CheckpointImportError("the UNet has no cross-attention (attn2): not a conditional model")
    context = u[to_k[0]].shape[1]
    depth = 1 + max(int(k.split("transformer_blocks.")[1].split(".")[0]) for k in u if "transformer_blocks." in k)
    for k in to_k:
        if u[k].shape[0] % heads:
            raise CheckpointImportError(f"{k}: width {u[k].shape[0]} is not divisible by heads={heads}")
    return UNetConfig(in_channels=int(in_ch), out_channels=int(u["out.2.weight"].shape[0]), base=int(base),
                      mults=tuple(mults), num_res_blocks=nrb.pop(), attn_ds=attn_ds, heads=heads,
                      context_dim=int(context), transformer_depth=depth, self_attn=True)


def _schedule_from_state(sd: Mapping[str, torch.Tensor], report: ImportReport, where: str) -> Schedule:
    if "betas" not in sd:
        report.notes.append("no schedule buffers in the file: kpnb's default (ldm 'linear', 0.0015..0.0195, T=1000)")
        return Schedule()
    b = sd["betas"].double()
    s = Schedule(len(b))
    if not torch.allclose(s.betas, b, rtol=1e-5, atol=1e-9):
        s = Schedule(len(b), float(b[0]), float(b[-1]))
    if not torch.allclose(s.betas, b, rtol=1e-5, atol=1e-9):
        raise CheckpointImportError(
            f"{where}: betas (T={len(b)}, {float(b[0]):.6g}..{float(b[-1]):.6g}) are not ldm's 'linear' schedule "
            f"(linear in sqrt(beta)), the only one kpnb's Schedule represents")
    if "alphas_cumprod" in sd and not torch.allclose(s.alphas_cumprod, sd["alphas_cumprod"].double(), rtol=1e-4):
        raise CheckpointImportError(f"{where}: alphas_cumprod does not match cumprod(1 - betas)")
    report.notes.append(f"schedule checked: T={s.T}, betas {s.beta_start:.6g}..{s.beta_end:.6g} (ldm 'linear') match "
                        f"kpnb's Schedule (max |diff| {float((s.betas - b).abs().max()):.1e})")
    for k in SCHEDULE_KEYS:
        if k in sd:
            report.mapped[k] = "schedule (checked)" if k in ("betas", "alphas_cumprod") else "schedule (derived)"
    return s


def _scale_factor_from_state(sd: Mapping[str, torch.Tensor], scale_factor: float | None,
                             report: ImportReport) -> float:
    """The given ``scale_factor``, else the file's buffer, else ldm's default 1.0 (noted in ``report``)."""
    if scale_factor is not None:
        sf = float(scale_factor)
        in_file = float(sd["scale_factor"]) if "scale_factor" in sd else "none"
        report.notes.append(f"scale_factor {sf} (given; the file has {in_file})")
    elif "scale_factor" in sd:
        sf = float(sd["scale_factor"])
        report.notes.append(f"scale_factor {sf:.6g} from the file")
    else:
        sf = 1.0
        report.notes.append("scale_factor 1.0: not in the file (ldm keeps it as a buffer only with scale_by_std; "
                            "the original config sets none, so ldm's default 1.0 applies)")
    if "scale_factor" in sd:
        report.mapped["scale_factor"] = "scale_factor"
    return sf


def _ldm_unused_reason(key: str, ema_used: bool) -> str:
    if key.startswith("model.diffusion_model."):
        return "non-EMA UNet weights (the EMA copy was loaded; ema=False loads these)" if ema_used else \
            "UNet weight kpnb's model has no place for"
    if key.startswith("model_ema.diffusion_model"):
        return "EMA UNet weights (ema=False: the plain weights were loaded)"
    if key in ("model_ema.decay", "model_ema.num_updates"):
        return "EMA bookkeeping (decay, number of updates)"
    if key.startswith("cond_stage_model."):
        return "conditioning stage (the original's DummyEncoder passes the 17 tokens through)"
    if key.startswith("first_stage_model.loss."):
        return "first stage's training loss"
    if key == "logvar":
        return "ldm's per-timestep log-variance (not used for epsilon prediction)"
    return "not used by kpnb"


def load_original_ldm(path: str | Path, *, ema: bool = True, heads: int = 8, image_size: int = 256,
                      scale_factor: float | None = None, verbose: bool = True) -> tuple[KeypointLDM, VQModel]:
    """The original project's keypoint latent-diffusion checkpoint (a Lightning ``.ckpt``) as
    ``(KeypointLDM, VQModel)``, both in eval mode.

    * UNet: EMA weights (``model_ema.*``) when the file has them and ``ema`` is True (ldm samples with them),
      else ``model.diffusion_model.*``; its configuration from the shapes (:func:`unet_config_from_state`,
      ``heads`` given: 8 in the original). Conditioning: kpnb's ``grid`` mode (the 17 grid tokens as one
      [1, 17] context, as the original); its learned null pose is new (the original had no guidance): sample
      at guidance 1, or train it.
    * VQ: the checkpoint's ``first_stage_model`` (as :func:`load_original_vq`).
    * Schedule: ``betas``/``alphas_cumprod`` checked against kpnb's :class:`~kpnb.diffusion.schedule.Schedule`.
    * ``scale_factor``: the file's buffer when it has one (ldm stores it only with ``scale_by_std``), else
      ldm's default 1.0 (the original config sets none); an explicit argument wins.

    Latents are ``image_size / factor`` square (256 / 4 = 64). The :class:`ImportReport` is
    ``ldm.import_report`` (printed when ``verbose``), the VQ's ``vq.import_report``.

    Suggested place for the file: ``data/checkpoints/original_ldm_keypoints.ckpt``."""
    ck = load_lightning_checkpoint(path, what="ldm")
    sd, where = ck.state_dict, str(ck.path)
    if "first_stage_model.encoder.conv_in.weight" not in sd:
        raise CheckpointImportError(f"{where}: no first_stage_model.* weights - not a latent-diffusion checkpoint "
                                    f"(a VQGAN alone goes through load_original_vq)")
    vq_report = ImportReport(where, meta=dict(ck.meta))
    vq = vq_from_state(sd, "first_stage_model.", vq_report, image_size=image_size, where=where)
    vq.import_report = vq_report

    report = ImportReport(where, meta=dict(ck.meta))
    if ck.placeholders:
        report.notes.append(f"Lightning metadata replaced by inert placeholders: {', '.join(ck.placeholders)}")
    sources: dict[str, str] = {}
    try:
        unet_sd = unet_state_from_ldm(sd, ema=ema, sources=sources)
    except KeyError as e:
        raise CheckpointImportError(f"{where}: {e.args[0]}") from e
    ema_used = any(s.startswith("model_ema.") for s in sources.values())
    report.meta["weights"] = "EMA" if ema_used else "non-EMA"
    if ema and not ema_used:
        report.notes.append("the file has no EMA weights: loaded the plain UNet weights")
    ucfg = unet_config_from_state(unet_sd, heads=heads)
    if ucfg.context_dim != N_JOINTS:
        raise CheckpointImportError(f"{where}: the UNet's context is {ucfg.context_dim} wide, not the "
                                    f"{N_JOINTS} keypoint grid tokens: not the keypoint model")
    if ucfg.in_channels != vq.cfg.latent_channels:
        raise CheckpointImportError(f"{where}: UNet takes {ucfg.in_channels} channels, the VQ gives "
                                    f"{vq.cfg.latent_channels} (concat conditioning is not the original's)")
    schedule = _schedule_from_state(sd, report, where)
    sf = _scale_factor_from_state(sd, scale_factor, report)
    S = image_size // vq.cfg.factor
    model = KeypointLDM(ucfg, PoseConditioner("grid", latent_size=S), (ucfg.in_channels, S, S), sf, schedule)
    kpnb_only = {"cond.null_grid": "kpnb's learned null pose for classifier-free guidance (the original had "
                                   "none): kept at its initial value - sample at guidance 1, or train it"}
    copy_into(model, {f"unet.{k}": [src] for k, src in sources.items()}, sd, report, kpnb_only=kpnb_only,
               where=where)
    check_missing(report, kpnb_only, where)
    for k in sd:
        if k.startswith("first_stage_model."):
            if k in vq_report.mapped:
                report.mapped[k] = "vq." + vq_report.mapped[k]
            else:
                report.unused[k] = vq_report.unused.get(k, "first stage")
        elif k not in report.mapped:
            report.unused[k] = _ldm_unused_reason(k, ema_used)
    report.notes.append(f"UNet config from the tensor shapes (heads={heads} given): {ucfg}")
    model.import_report = report
    if verbose:
        print(report)
    return model.eval(), vq


def ldm_state_to_original(ldm: KeypointLDM, vq: VQModel) -> dict[str, torch.Tensor]:
    """A kpnb ``grid``-mode :class:`~kpnb.diffusion.ldm.KeypointLDM` and its VQ as one latent-diffusion state dict,
    laid out as the original project's released keypoint checkpoint: the UNet as ``model.diffusion_model.*``
    and (the same weights) ``model_ema.diffusion_model*``, the VQ as ``first_stage_model.*``
    (:func:`vq_state_to_original`), ldm's schedule buffers and ``scale_factor``.

    Only what the original could be: the ``grid`` conditioning alone, epsilon prediction, a UNet with
    self-attention (ldm always has it), a VQ in taming's layout. Anything else raises ``ValueError`` naming
    what differs, rather than writing a file the original code (and :func:`load_original_ldm`) would read
    as a different model."""
    why = []
    if tuple(ldm.cond.modes) != ("grid",):
        why.append(f"conditioning {ldm.cond.modes} (the original has only 'grid')")
    if ldm.prediction != "eps":
        why.append(f"prediction {ldm.prediction!r} (the original predicts eps)")
    unet = {k: v.detach().clone() for k, v in ldm.unet.state_dict().items()}
    if not why:
        try:
            got = unet_config_from_state(unet, heads=ldm.unet.cfg.heads)
        except CheckpointImportError as e:
            got = e
        if got != ldm.unet.cfg:
            why.append(f"UNet {ldm.unet.cfg} reads back as {got}")
        vq_sd = vq_state_to_original(vq)
        try:
            back = vq_config_from_state(vq_sd, image_size=vq.cfg.image_size)
        except CheckpointImportError as e:
            back = e
        if not isinstance(back, VQConfig) or replace(back, **vq_training_only(vq.cfg)) != vq.cfg:
            why.append(f"VQ {vq.cfg.to_dict()} reads back as {back}")
    if why:
        raise ValueError("not representable in the original layout: " + "; ".join(why))
    sd = {f"model.diffusion_model.{k}": v for k, v in unet.items()}
    sd.update({f"model_ema.diffusion_model{k.replace('.', '')}": v.clone() for k, v in unet.items()})
    sd.update({f"first_stage_model.{k}": v for k, v in vq_sd.items()})
    s = ldm.schedule
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), s.alphas_cumprod[:-1]])
    buffers = {"betas": s.betas, "alphas_cumprod": s.alphas_cumprod, "alphas_cumprod_prev": ac_prev,
               "sqrt_alphas_cumprod": s.alphas_cumprod.sqrt(), "sqrt_one_minus_alphas_cumprod": (1 - s.alphas_cumprod).sqrt(),
               "posterior_variance": s.betas * (1 - ac_prev) / (1 - s.alphas_cumprod)}
    sd.update({k: v.float() for k, v in buffers.items()})  # ldm computes them in float64 and stores float32
    sd["scale_factor"] = torch.tensor(float(ldm.scale_factor))
    return sd


def save_original_ldm(ldm: KeypointLDM, vq: VQModel, path: str | Path, *, step: int = 0) -> Path:
    """Write :func:`ldm_state_to_original` as a Lightning-shaped ``.ckpt`` (``state_dict``, ``global_step``,
    ``epoch``) that :func:`load_original_ldm` and ``kpnb sample --model`` read as a released checkpoint.
    Written to a temporary name and renamed, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"state_dict": ldm_state_to_original(ldm, vq), "global_step": int(step), "epoch": 0,
                "pytorch-lightning_version": "exported by kpnb"}, tmp)
    tmp.replace(path)
    return path
