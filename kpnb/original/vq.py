"""The released taming VQGAN read into kpnb's VQ model, and written back."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from kpnb.models.vq import VQConfig, VQModel
from kpnb.original.common import ImportReport, check_missing, copy_into, load_lightning_checkpoint
from kpnb.original.lightning import (
    CheckpointImportError,
)

# ======================================================================================================
# The VQGAN (taming-transformers layout)
# ======================================================================================================
_TAMING_RES = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "skip": "nin_shortcut"}
_VQ_OWN = ("encoder.", "decoder.", "quantize.", "quant_conv.", "post_quant_conv.")
_VQ_BOOKKEEPING = {"quantizer.usage": "kpnb's code-usage average (training bookkeeping): uniform",
                   "quantizer.initialized": "kpnb's 'codebook initialised from data' flag: set to True"}


def _vq_module_pairs(cfg: VQConfig) -> list[tuple[str, str, str]]:
    """(kind, kpnb module, taming module) for every module with weights, in kpnb's construction order."""
    L = len(cfg.channel_mult)
    pairs = [("plain", "encoder.conv_in", "encoder.conv_in")]
    k = 0
    for i in range(L):
        for j in range(cfg.res_blocks):
            pairs.append(("res", f"encoder.down.{k}", f"encoder.down.{i}.block.{j}"))
            k += 1
        if i < L - 1:
            pairs.append(("plain", f"encoder.down.{k}.conv", f"encoder.down.{i}.downsample.conv"))
            k += 1
    for side in ("encoder", "decoder"):
        mid = [("res", "block_1")] + ([("attn", "attn_1")] if cfg.mid_attention else []) + [("res", "block_2")]
        pairs += [(kind, f"{side}.mid.{n}", f"{side}.mid.{name}") for n, (kind, name) in enumerate(mid)]
    pairs += [("plain", "encoder.norm_out", "encoder.norm_out"), ("plain", "encoder.conv_out", "encoder.conv_out"),
              ("plain", "decoder.conv_in", "decoder.conv_in")]
    k = 0
    for i in reversed(range(L)):  # kpnb runs the decoder top-down in one Sequential; taming indexes by level
        for j in range(cfg.dec_res_blocks):
            pairs.append(("res", f"decoder.up.{k}", f"decoder.up.{i}.block.{j}"))
            k += 1
        if i > 0:
            pairs.append(("plain", f"decoder.up.{k}.conv", f"decoder.up.{i}.upsample.conv"))
            k += 1
    pairs += [("plain", "decoder.norm_out", "decoder.norm_out"), ("plain", "decoder.conv_out", "decoder.conv_out")]
    if cfg.quant_conv:
        pairs += [("plain", "quant_conv", "quant_conv"), ("plain", "post_quant_conv", "post_quant_conv")]
    return pairs


def vq_key_map(model: VQModel) -> dict[str, list[str]]:
    """{kpnb VQModel tensor name: [taming key(s)]} for every tensor of ``model`` that comes from the file
    (several keys = concatenated along dim 0: attention q, k, v -> qkv). kpnb's codebook bookkeeping
    (``quantizer.usage``, ``quantizer.initialized``) has no source."""
    if model.cfg.stem != 1:
        raise CheckpointImportError(f"a VQModel with stem {model.cfg.stem} has no taming counterpart (stem 1 only)")
    pairs = _vq_module_pairs(model.cfg)
    out: dict[str, list[str]] = {"quantizer.codebook": ["quantize.embedding.weight"]}
    for key in model.state_dict():
        if key in out or key in _VQ_BOOKKEEPING:
            continue
        hit = [(kind, kp, orig) for kind, kp, orig in pairs if key.startswith(kp + ".")]
        if len(hit) != 1:
            raise CheckpointImportError(f"kpnb VQ tensor {key}: no unique taming counterpart ({len(hit)} matches)")
        kind, kp, orig = hit[0]
        sub = key[len(kp) + 1:]
        if kind == "plain":
            out[key] = [f"{orig}.{sub}"]
        elif kind == "res":
            mod, param = sub.split(".", 1)
            out[key] = [f"{orig}.{_TAMING_RES[mod]}.{param}"]
        else:  # attention: norm, fused qkv, out
            mod, param = sub.split(".", 1)
            if mod == "qkv":
                out[key] = [f"{orig}.{p}.{param}" for p in ("q", "k", "v")]
            else:
                out[key] = [f"{orig}.{ {'norm': 'norm', 'out': 'proj_out'}[mod]}.{param}"]
    return out


def vq_state_to_original(model: VQModel) -> dict[str, torch.Tensor]:
    """The inverse of the import: a kpnb VQModel's weights under taming's key names (``qkv`` split back into
    ``q``/``k``/``v``), e.g. to compare against, or feed, the original code."""
    sd = model.state_dict()
    out = {}
    for k, srcs in vq_key_map(model).items():
        for name, part in zip(srcs, sd[k].chunk(len(srcs), 0) if len(srcs) > 1 else [sd[k]]):
            out[name] = part.detach().clone()
    return out


def vq_config_from_state(sd: Mapping[str, torch.Tensor], *, image_size: int = 256) -> VQConfig:
    """The :class:`kpnb.models.vq.VQConfig` of a taming VQGAN state dict (keys without a prefix), read from the tensor
    shapes: base width, channel multipliers, res blocks per level (encoder and decoder), latent channels,
    codebook size, middle attention, quant convs. Raises :class:`CheckpointImportError` for layouts kpnb
    cannot represent (see the module docstring). ``image_size`` is not in the weights (the original: 256)."""
    need = ["encoder.conv_in.weight", "encoder.conv_out.weight", "decoder.conv_in.weight",
            "quantize.embedding.weight"]
    absent = [k for k in need if k not in sd]
    if absent:
        raise CheckpointImportError(f"not a taming VQGAN state dict: no {', '.join(absent)}")
    base, in_ch = sd["encoder.conv_in.weight"].shape[:2]
    if in_ch != 3:
        raise CheckpointImportError(f"encoder.conv_in takes {in_ch} channels; kpnb's VQ model reads RGB (3)")
    levels = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.down.")})
    if levels != list(range(len(levels))) or not levels:
        raise CheckpointImportError(f"encoder levels {levels}: expected 0..L-1")
    attn = sorted({k.rsplit(".attn.", 1)[0] for k in sd if ".attn." in k and k.startswith(("encoder.", "decoder."))})
    if attn:
        raise CheckpointImportError(
            f"attention inside the encoder/decoder levels ({', '.join(attn)}; taming's attn_resolutions is not "
            f"empty) cannot be represented: kpnb's VQModel has attention only in the middle block")

    def count(prefix: str) -> int:
        return len({k[len(prefix):].split(".", 1)[0] for k in sd if k.startswith(prefix)})

    mult = []
    for i in levels:
        w = sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]
        if w % base:
            raise CheckpointImportError(f"encoder level {i} has width {w}, not a multiple of the base width {base}")
        mult.append(w // base)
    z = sd["encoder.conv_out.weight"].shape[0]
    n_codes, e_dim = sd["quantize.embedding.weight"].shape
    quant = "quant_conv.weight" in sd
    if quant and tuple(sd["quant_conv.weight"].shape[:2]) != (e_dim, z):
        raise CheckpointImportError(f"quant_conv maps {tuple(sd['quant_conv.weight'].shape[1::-1])}: inconsistent")
    if z != e_dim:
        raise CheckpointImportError(
            f"the encoder gives {z} channels but codes have {e_dim} (double_z, or z_channels != embed_dim): kpnb's "
            f"VQ model keeps one latent width")
    if sd["decoder.conv_in.weight"].shape[1] != e_dim:
        raise CheckpointImportError(f"decoder.conv_in takes {sd['decoder.conv_in.weight'].shape[1]} channels, "
                                    f"codes have {e_dim}")
    return VQConfig(factor=2 ** (len(levels) - 1), image_size=image_size, latent_channels=int(e_dim),
                    n_codes=int(n_codes), base_width=int(base), channel_mult=tuple(mult),
                    res_blocks=count("encoder.down.0.block."), dec_res_blocks=count("decoder.up.0.block."), stem=1,
                    mid_attention="encoder.mid.attn_1.q.weight" in sd, quant_conv=quant)


def _vq_unused_reason(key: str) -> str:
    if key.startswith("loss.discriminator."):
        return "training loss: the PatchGAN discriminator (not part of the autoencoder)"
    if key.startswith("loss.perceptual_loss."):
        return "training loss: LPIPS perceptual network (not part of the autoencoder)"
    if key.startswith("loss."):
        return "training loss state (not part of the autoencoder)"
    return "not used by kpnb's VQ model"


def vq_from_state(state: Mapping[str, torch.Tensor], prefix: str, report: ImportReport, *, image_size: int,
                   where: str) -> VQModel:
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    cfg = vq_config_from_state(sub, image_size=image_size)
    model = VQModel(cfg)
    wrong = sorted({m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm) and m.num_groups != 32})
    if wrong:
        raise CheckpointImportError(
            f"{where}: base width {cfg.base_width} makes kpnb's VQ use GroupNorm with {wrong} groups where taming "
            f"always uses 32 (kpnb needs every normalised width >= 64 and a multiple of 32 to match)")
    copy_into(model, vq_key_map(model), state, report, prefix=prefix, kpnb_only=_VQ_BOOKKEEPING, where=where)
    check_missing(report, _VQ_BOOKKEEPING, where)
    with torch.no_grad():
        model.quantizer.usage.fill_(1.0 / cfg.n_codes)
        model.quantizer.initialized.fill_(True)
    for k, why in _VQ_BOOKKEEPING.items():
        report.missing.pop(k, None)
        report.notes.append(f"{k}: {why}")
    leftover = [k for k in sub if prefix + k not in report.mapped]
    own = [k for k in leftover if k.startswith(_VQ_OWN)]
    if own:
        raise CheckpointImportError(
            f"{where}: VQGAN weights kpnb's model would ignore: {', '.join(prefix + k for k in own[:8])}")
    for k in leftover:
        report.unused[prefix + k] = _vq_unused_reason(k)
    report.notes.append(f"VQ config from the tensor shapes: {cfg.to_dict()}")
    return model.eval()


def load_original_vq(path: str | Path, *, image_size: int = 256, verbose: bool = True) -> VQModel:
    """The original project's taming-transformers VQGAN (a Lightning ``.ckpt``, read by
    :func:`load_lightning_checkpoint`) as a :class:`kpnb.models.vq.VQModel` in eval mode.

    The configuration comes from the tensor shapes (:func:`vq_config_from_state`); every encoder, decoder,
    codebook and quant-conv tensor is mapped (:func:`vq_key_map`) and shape-checked; ``loss.*``
    (discriminator, LPIPS) is dropped. A latent-diffusion checkpoint works too (its ``first_stage_model.*``).
    The :class:`ImportReport` is ``model.import_report`` (printed when ``verbose``).

    Suggested place for the file: ``data/checkpoints/original_vq_f4.ckpt``."""
    ck = load_lightning_checkpoint(path, what="vq")
    sd = ck.state_dict
    prefix = "" if "encoder.conv_in.weight" in sd else "first_stage_model." \
        if "first_stage_model.encoder.conv_in.weight" in sd else None
    if prefix is None:
        raise CheckpointImportError(f"{ck.path}: no taming VQGAN weights (encoder.conv_in.weight) in its state_dict")
    report = ImportReport(str(ck.path), meta=dict(ck.meta))
    if ck.placeholders:
        report.notes.append(f"Lightning metadata replaced by inert placeholders: {', '.join(ck.placeholders)}")
    if prefix:
        report.notes.append("read the first stage (first_stage_model.*) of a latent-diffusion checkpoint")
    model = vq_from_state(sd, prefix, report, image_size=image_size, where=str(ck.path))
    for k in sd:
        if not k.startswith(prefix) and k not in report.mapped:
            report.unused[k] = "not part of the VQ model"
    model.import_report = report
    if verbose:
        print(report)
    return model


# ---- the other way: kpnb's models in the original layout ---------------------------------------------
def vq_training_only(cfg: VQConfig) -> dict[str, Any]:  # VQ settings that only training reads: not in the weights
    return {"beta": cfg.beta, "usage_decay": cfg.usage_decay, "dead_threshold": cfg.dead_threshold}
