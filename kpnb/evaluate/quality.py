"""Image quality beside pose accuracy: FID and KID in a feature space, and sample diversity.

PCK and keypoint AP say whether a generated character holds the pose; nothing there says whether it looks like
the data. This module measures that the way every paper kpnb stands beside does (latent diffusion, taming's
transformer, HumanSD, ControlNet): the Frechet distance (FID) and the kernel distance (KID, unbiased, with a
spread over subsets) between features of generated images and of held-out real images.

The formulas are torchmetrics' (``FrechetInceptionDistance`` / ``KernelInceptionDistance``, which accept any
feature network), not re-implemented here. The features:

* :class:`ClipFeatures` (the default everywhere in the workbook): the image tower of the run's CLIP - the
  domain CLIP trained on a separate synthetic pool with captions (``kpnb.run.stages.clip_for_run``), or a pretrained
  open_clip when the run points at one. It is trained on this domain's images and their captions (hair,
  clothes, pose), so its embedding separates what a person looking at these characters would; the attribute
  classifier's penultimate layer knows only its few attributes. Nothing is downloaded.
* Inception-v3 (the FID of the papers), only from a local weights file (:func:`inception_features`): the
  torch-fidelity Inception weights file (:data:`INCEPTION_FILE`) a person downloads once. A missing file or a missing
  ``torch-fidelity`` raises an error naming what to get.

Numbers from different feature networks, image sizes or numbers of images are not comparable: every result
carries ``n_real``, ``n_fake`` and the feature network's name.

Diversity (:func:`diversity`): for one pose, the mean pairwise feature distance between its samples, beside the
same for real held-out images whose poses are nearest to it - a model that draws the same character every time
scores far below the real images.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from kpnb.core.images import check_uint8_images
from kpnb.models.clip import clip_input
from kpnb.poses.analysis import nearest_as_placed

# torch-fidelity's Inception weights: the release tag of the TF graph they were converted from, then a hash
_INCEPTION_TAG = "-".join(("2015", "12", "05", "6726825d"))
INCEPTION_FILE = f"pt_inception-{_INCEPTION_TAG}.pth"
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 f"weights-inception-{_INCEPTION_TAG}.pth")


class ClipFeatures(nn.Module):
    """An open_clip model's image embedding (before normalisation) as a torchmetrics feature network:
    uint8 images ``[N, 3, H, W]`` in, float ``[N, D]`` out (resized and normalised as the model expects)."""

    def __init__(self, clip_model: nn.Module, name: str = "domain CLIP"):
        super().__init__()
        self.clip = clip_model.eval()
        self.name = name
        self.num_features = int(getattr(clip_model.visual, "output_dim", 0) or self._probe())

    def _probe(self) -> int:
        return int(self.forward(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).shape[-1])

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        dev = next(self.clip.parameters()).device
        x = images.to(dev).float() / 255.0 if images.dtype == torch.uint8 else images.to(dev).float()
        return self.clip.encode_image(clip_input(self.clip, x), normalize=False).float()


def inception_features(weights_path: str | Path) -> nn.Module:
    """torchmetrics' Inception-v3 (torch-fidelity's FID network, 2048 pool features) from a local weights file.
    Raises FileNotFoundError naming the file to download when it is not there."""
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no Inception weights. FID with Inception features needs torch-fidelity's "
                                f"{INCEPTION_FILE} (download {INCEPTION_URL} once and point at the file); nothing is "
                                f"downloaded while kpnb runs. Without it kpnb reports FID in the run's CLIP features.")
    # torch-fidelity reads the file with torch.load(weights_only=False), which would run code a pickle asks for:
    # read it here first with weights only, so such a file is refused before that
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means "not a plain weights file"
        raise ValueError(f"{path}: not a plain weights file (refused without running it: {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]})") from e
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors (expected torch-fidelity's {INCEPTION_FILE})")
    from torchmetrics.image.fid import NoTrainInceptionV3

    try:
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                 feature_extractor_weights_path=str(path))
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError("Inception features need torch-fidelity: pip install torch-fidelity "
                                  "(or leave the Inception file unset: FID in the run's CLIP features)") from e
    net.name = f"Inception-v3 ({path.name})"
    net.num_features = 2048
    return net


def _nchw_uint8(images: Any, what: str) -> torch.Tensor:
    """uint8 images [N, H, W, 3] as the uint8 tensor [N, 3, H, W] the feature networks take."""
    return torch.from_numpy(np.ascontiguousarray(check_uint8_images(images, what))).permute(0, 3, 1, 2)


class ImageDistance:
    """FID and KID of image sets against one fixed set of real images, in one feature space.

    The real images' features are computed once (``reset_real_features=False``); :meth:`score` takes any
    number of generated sets. ``kid_subsets``/``kid_subset_size``: KID is the mean (and standard deviation)
    of the polynomial-kernel MMD over random subsets (torchmetrics' defaults 100 subsets; the size is capped
    by the smaller set)."""

    def __init__(self, real_images: Any, features: nn.Module, *, batch_size: int = 128, kid_subsets: int = 50,
                 kid_subset_size: int = 100):
        from torchmetrics.image.fid import FrechetInceptionDistance

        real = _nchw_uint8(real_images, "real images")
        if len(real) < 2:
            raise ValueError(f"FID needs at least 2 real images, got {len(real)}")
        self.features, self.batch_size = features, batch_size
        self.name = getattr(features, "name", type(features).__name__)
        self.n_real = len(real)
        self.kid_subsets, self.kid_subset_size = kid_subsets, kid_subset_size
        # every image goes through the feature network once; FID and KID are handed the features
        self._real = self._feats(real)
        self._fid = FrechetInceptionDistance(feature=_Identity(self._real.shape[1]), reset_real_features=False)
        self._fid.update(self._real, real=True)

    def _feats(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.features(x[i:i + self.batch_size]).double().cpu()
                          for i in range(0, len(x), self.batch_size)])

    def score(self, images: Any, seed: int = 0) -> dict[str, float]:
        """``{"fid", "kid", "kid_std", "n_fake"}`` of ``images`` (uint8 [N, H, W, 3]) against the real set."""
        from torchmetrics.image.kid import KernelInceptionDistance

        fake = _nchw_uint8(images, "generated images")
        if len(fake) < 2:
            raise ValueError(f"FID needs at least 2 generated images, got {len(fake)}")
        feats = self._feats(fake)
        self._fid.reset()
        self._fid.update(feats, real=False)
        fid = float(self._fid.compute())
        size = min(self.kid_subset_size, self.n_real, len(fake))
        with warnings.catch_warnings():  # its "saves all extracted features" note: these are the n real + n fake
            warnings.filterwarnings("ignore", message=".*will save all extracted features", category=UserWarning)
            kid = KernelInceptionDistance(feature=_Identity(self._real.shape[1]), subsets=self.kid_subsets,
                                          subset_size=size)
        kid.update(self._real, real=True)
        kid.update(feats, real=False)
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # KID's subsets are drawn with torch's global generator
            mean, std = kid.compute()
        return {"fid": fid, "kid": float(mean), "kid_std": float(std), "n_fake": len(fake)}


class _Identity(nn.Module):
    """Features computed already: FID and KID are handed them directly."""

    def __init__(self, n: int):
        super().__init__()
        self.num_features = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def spread(results: Sequence[Mapping[str, float]], key: str) -> dict[str, float]:
    """Mean and half the range of ``key`` over results for different sample seeds (two seeds: +- half the gap)."""
    v = np.array([r[key] for r in results], dtype=np.float64)
    return {key: float(v.mean()), f"{key}_spread": float((v.max() - v.min()) / 2) if len(v) > 1 else float("nan")}


# ---- diversity ----------------------------------------------------------------------------------------
def mean_pairwise_distance(feats: Any) -> float:
    """Mean Euclidean distance over all pairs of rows of ``feats`` [N, D] (unit-normalised first, so a
    distance is 0..2 whatever the feature scale)."""
    f = torch.as_tensor(np.asarray(feats), dtype=torch.float64)
    if len(f) < 2:
        raise ValueError(f"diversity needs at least 2 images, got {len(f)}")
    f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
    d = torch.cdist(f, f)
    n = len(f)
    return float(d.sum() / (n * (n - 1)))


def diversity(features: nn.Module, samples: Any, real_images: Any, real_poses: Any, pose: Any,
              k: int | None = None) -> dict[str, float]:
    """Diversity for one pose: ``samples`` (uint8 [n, H, W, 3], all for ``pose``) against the ``k`` (default n)
    real images whose poses are nearest to it. Returns ``samples`` and ``real`` (mean pairwise feature
    distances), their ``ratio`` and ``real_pose_distance`` (how near those real poses are, frame units)."""
    s = _nchw_uint8(samples, "samples")
    k = k or len(s)
    idx = nearest_as_placed(pose, real_poses, k)
    r = _nchw_uint8(np.asarray(real_images)[idx], "real images")
    ds, dr = mean_pairwise_distance(features(s).cpu()), mean_pairwise_distance(features(r).cpu())
    rp = np.asarray(real_poses, np.float64)[idx]
    near = float(np.mean(np.linalg.norm(rp[..., :2] - np.asarray(pose, np.float64)[None, :, :2], axis=-1)))
    return {"samples": ds, "real": dr, "ratio": ds / dr if dr > 0 else float("nan"), "real_pose_distance": near}


# ---- the head region: where f8 is said to lose what f4 keeps -----------------------------------------
def head_boxes(poses: Any, min_side: float = 0.2, scale: float = 2.5) -> np.ndarray:
    """One square box per pose around its head joints (nose, eyes, ears in the frame), in frame units:
    float [N, 4] = (x0, y0, x1, y1), side ``scale`` x the head joints' extent but at least ``min_side`` (the
    hair around the face is part of what is judged), kept inside the frame; NaN for a pose with fewer than
    two head joints in the frame."""
    from kpnb.poses.pose import HIDDEN, JOINT_GROUPS, VISIBLE

    p = np.asarray(poses, np.float64)
    head = p[:, JOINT_GROUPS["head"]]
    ok = np.isin(head[..., 2], (VISIBLE, HIDDEN)) & (head[..., :2] >= 0).all(-1) & (head[..., :2] < 1).all(-1)
    out = np.full((len(p), 4), np.nan)
    for i in np.flatnonzero(ok.sum(1) >= 2):
        xy = head[i, ok[i], :2]
        lo, hi = xy.min(0), xy.max(0)
        side = min(1.0, max(min_side, scale * float((hi - lo).max())))
        c = np.clip((lo + hi) / 2, side / 2, 1 - side / 2)
        out[i] = (c[0] - side / 2, c[1] - side / 2, c[0] + side / 2, c[1] + side / 2)
    return out


def crop_boxes(images: Any, boxes: np.ndarray, size: int = 32) -> np.ndarray:
    """uint8 [N, H, W, 3] images cut to ``boxes`` (frame units, from :func:`head_boxes`) and resized to
    ``size``: uint8 [M, size, size, 3] for the M boxes that are not NaN (bilinear, antialiased)."""
    import torch.nn.functional as F

    keep = ~np.isnan(boxes).any(1)
    ims = np.asarray(images)[keep]
    out = []
    for im, (x0, y0, x1, y1) in zip(ims, boxes[keep]):
        h, w = im.shape[:2]
        a, b = int(round(y0 * h)), max(int(round(y1 * h)), int(round(y0 * h)) + 1)
        c, d = int(round(x0 * w)), max(int(round(x1 * w)), int(round(x0 * w)) + 1)
        t = torch.from_numpy(np.ascontiguousarray(im[a:b, c:d])).permute(2, 0, 1)[None].float()
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out.append(t[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy())
    return np.stack(out) if out else np.zeros((0, size, size, 3), np.uint8)
