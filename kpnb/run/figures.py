"""Figures: image grids, pose overlays, scatter and heat maps, loss curves. Each returns a matplotlib Figure
and, given ``path``, saves it as PNG (200 dpi for the write-up's figures)."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from kpnb.core.files import atomic_path
from kpnb.poses.pose import JOINTS, LIMB_COLOURS, LIMBS, Pose, draw_skeleton


def _plt():
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: str | Path | None, dpi: int = 200) -> Any:
    """Write ``fig`` to ``path`` (its suffix names the format) whole or not at all (:func:`atomic_path`)."""
    if path is not None:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", dpi=dpi, bbox_inches="tight")
    return fig


def image_grid(images: Sequence[np.ndarray], titles: Sequence[str] | None = None, ncols: int = 10,
               size: float = 1.2, path: str | Path | None = None, suptitle: str | None = None) -> Any:
    """A grid of uint8 images with optional small titles."""
    plt = _plt()
    n = max(1, len(images))
    ncols = min(ncols, n)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * size, nrows * size * (1.25 if titles else 1)),
                             squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < len(images):
            ax.imshow(images[k], interpolation="nearest")
            if titles:
                ax.set_title(titles[k], fontsize=6)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    return save(fig, path)


def overlay(image: np.ndarray, pose: Pose | np.ndarray, size: int = 128) -> np.ndarray:
    """The pose's skeleton drawn over the image, upscaled to ``size``."""
    if not isinstance(pose, Pose):
        pose = Pose.from_array(pose)
    return draw_skeleton(pose, size, background=image)


def pose_sample_grid(poses: Sequence[Pose], images: np.ndarray, estimated: np.ndarray, n_per_pose: int,
                     path: str | Path | None = None) -> Any:
    """One row per conditioning pose: the pose drawn, then its ``n_per_pose`` samples (``images`` in pose
    order) with the pose the estimator found in each drawn on top."""
    tiles, titles = [], []
    for j, pose in enumerate(poses):
        tiles.append(draw_skeleton(pose, 128))
        tiles += [overlay(images[n_per_pose * j + s], estimated[n_per_pose * j + s], 128) for s in range(n_per_pose)]
        titles += ["pose", "samples (estimated pose drawn)"] + [""] * (n_per_pose - 1)
    return image_grid(tiles, titles, ncols=1 + n_per_pose, size=1.6, path=path)


def skeleton_grid(poses: Sequence[Any], images: Sequence[np.ndarray] | None = None, titles=None, ncols: int = 8,
                  size: int = 128, path=None, suptitle=None) -> Any:
    tiles = [overlay(images[i], p, size) if images is not None else draw_skeleton(
        p if isinstance(p, Pose) else Pose.from_array(p), size) for i, p in enumerate(poses)]
    return image_grid(tiles, titles, ncols=ncols, size=1.6, path=path, suptitle=suptitle)


def hip_scatter(hip_xy: np.ndarray, keep: np.ndarray | None = None, frame: int = 512, path=None) -> Any:
    """The original analysis' hip-midpoint scatter, in the 512 frame (y down); kept vs removed."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5))
    p = hip_xy * frame
    if keep is None:
        ax.scatter(p[:, 0], p[:, 1], s=2, alpha=0.4)
    else:
        # removed first, kept on top: the kept cluster must stay visible under the failures
        ax.scatter(p[~keep, 0], p[~keep, 1], s=3, alpha=0.35, c="red", label=f"removed ({(~keep).sum()})")
        ax.scatter(p[keep, 0], p[keep, 1], s=2, alpha=0.5, c="tab:blue", label=f"kept ({keep.sum()})")
        ax.legend(fontsize=7, loc="upper right")
    ax.axhline(frame, color="grey", lw=0.5, ls="--")
    ax.axvline(0, color="grey", lw=0.5, ls="--")
    ax.axvline(frame, color="grey", lw=0.5, ls="--")
    ax.set_xlim(-0.5 * frame, 1.5 * frame)
    ax.set_ylim(2.0 * frame, -0.25 * frame)
    ax.set_xlabel("hip midpoint x (512 frame)")
    ax.set_ylabel("hip midpoint y (512 frame; > 512 = below the frame)")
    ax.set_title("hip midpoints", fontsize=9)
    fig.tight_layout()
    return save(fig, path)


def joint_heatmaps(poses: np.ndarray, bins: int = 32, path=None) -> Any:
    """Per-joint 2D histograms of in-frame positions."""
    plt = _plt()
    fig, axes = plt.subplots(3, 6, figsize=(12, 6.4))
    for j, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if j >= len(JOINTS):
            ax.axis("off")
            continue
        m = (poses[:, j, 2] == 1) | (poses[:, j, 2] == 2)
        h, _, _ = np.histogram2d(poses[m, j, 1], poses[m, j, 0], bins=bins, range=[[0, 1], [0, 1]])
        ax.imshow(h, cmap="magma")
        ax.set_title(f"{JOINTS[j]} ({m.mean():.0%} in frame)", fontsize=7)
    fig.tight_layout()
    return save(fig, path)


def histograms(values: dict[str, np.ndarray], bins: int = 40, ncols: int = 4, path=None,
               limits: dict[str, tuple[float, float]] | None = None) -> Any:
    """One histogram per named array; optional (lo, hi) lines drawn on each."""
    plt = _plt()
    names = list(values)
    nrows = int(np.ceil(len(names) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * 3, nrows * 2.2), squeeze=False)
    for ax, name in zip(axes.flat, names):
        v = np.asarray(values[name])
        v = v[np.isfinite(v)]
        ax.hist(v, bins=bins, color="tab:blue", alpha=0.8)
        if limits and name in limits:
            for x in limits[name]:
                ax.axvline(x, color="red", lw=1)
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    return save(fig, path)


def loss_curves(csv_paths: dict[str, str | Path], keys: Sequence[str] = ("loss",), path=None,
                logy: bool = True) -> Any:
    """Loss curves from training metrics CSVs (one line per run and key)."""

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, p in csv_paths.items():
        with open(p) as f:
            rows = list(csv.DictReader(f))
        for k in keys:
            xs = [float(r["step"]) for r in rows if r.get(k) not in (None, "")]
            ys = [float(r[k]) for r in rows if r.get(k) not in (None, "")]
            if xs:
                ax.plot(xs, ys, label=f"{name} {k}" if len(keys) > 1 else name, lw=1)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save(fig, path)


def training_curve(points: Sequence[Mapping[str, float]], path=None, title: str = "") -> Any:
    """Losses on held-out and on training latents (left axis) and FID (right axis) against epochs, from
    ``points`` with ``epochs``, ``val_loss``, ``train_loss`` and ``fid`` (the overfitting check)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ep = [p["epochs"] for p in points]
    ax.plot(ep, [p["val_loss"] for p in points], "o-", label="loss, held-out latents")
    ax.plot(ep, [p["train_loss"] for p in points], "s--", label="loss, training latents")
    ax.set_xlabel("epochs")
    ax.set_ylabel("loss (same noise and timesteps)")
    ax2 = ax.twinx()
    ax2.plot(ep, [p["fid"] for p in points], "^-", color="tab:red", label="FID")
    ax2.set_ylabel("FID", color="tab:red")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7)
    if title:
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return save(fig, path)


def limb_legend(path=None) -> Any:
    """Which colour is which limb (left = warm, right = cool)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4, 3))
    for k, ((a, b), c) in enumerate(zip(LIMBS, LIMB_COLOURS)):
        ax.plot([0, 1], [k, k], color=np.array(c) / 255, lw=4)
        ax.text(1.1, k, f"{JOINTS[a]} - {JOINTS[b]}", va="center", fontsize=6)
    ax.set_xlim(0, 3)
    ax.axis("off")
    fig.tight_layout()
    return save(fig, path)


def token_cells(pose: Pose, path=None, title: str | None = None) -> Any:
    """The pose over the original tokeniser's 32x32 grid, each joint's token cell shaded and labelled
    (``keypoints.grid_tokens``, faithful order): a joint's cell is the one it lies in."""
    from kpnb.poses.pose import GRID, grid_tokens

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.imshow(draw_skeleton(pose, 512), extent=(0, 512, 512, 0))
    cell = 512 / GRID
    for t in grid_tokens(pose):
        y_cell, x_cell = int(t) % GRID, int(t) // GRID   # the original's transposed order: row is the fast index
        ax.add_patch(plt.Rectangle((x_cell * cell, y_cell * cell), cell, cell, fill=True, alpha=0.35, color="w"))
        ax.text(x_cell * cell + cell / 2, y_cell * cell - 2, str(int(t)), color="w", fontsize=5, ha="center")
    ax.set_xticks(np.arange(0, 513, cell), minor=True)
    ax.set_yticks(np.arange(0, 513, cell), minor=True)
    ax.grid(which="minor", color="0.3", lw=0.3)
    ax.set_xticks([0, 256, 512])
    ax.set_yticks([0, 256, 512])
    ax.set_title(title or "token cells (x // 16, y // 16)", fontsize=8)
    fig.tight_layout()
    return save(fig, path)


def labelled_rows(rows: Sequence[tuple[str, Sequence[np.ndarray]]], size: float = 1.4, path=None,
                  suptitle: str | None = None) -> Any:
    """Rows of images of equal length, each named by the title of its first image: ``rows`` = [(name, images)]."""
    tiles, titles = [], []
    for name, row in rows:
        tiles += list(row)
        titles += [name] + [""] * (len(row) - 1)
    return image_grid(tiles, titles, ncols=len(rows[0][1]), size=size, path=path, suptitle=suptitle)


def samples_by_pose(poses: Sequence[Pose], images: np.ndarray, n_per_pose: int, px: int = 128) -> list[np.ndarray]:
    """Tiles of one row per pose: the pose drawn at ``px`` pixels, then its ``n_per_pose`` samples (``images`` in
    pose order)."""
    tiles = []
    for j, pose in enumerate(poses):
        tiles.append(draw_skeleton(pose, px))
        tiles += list(images[n_per_pose * j:n_per_pose * (j + 1)])
    return tiles


def removed_and_kept(cands: Any, results: Sequence[Any], rng: np.random.Generator, path_of, n: int = 20) -> None:
    """The dataset filter's examples: for each stage ``n`` images it removed in the chain (not already removed by an
    earlier stage; titled with its reason and, with labels, the ground truth), then ``n`` kept images, each with
    its keypoint file drawn. ``cands``: the candidates (images, poses, labels); ``path_of(name)`` the figure's
    path for ``removed_<stage>`` and ``kept``; the images shown are drawn with ``rng``."""
    seen = np.ones(len(cands.images), bool)
    for r in results:
        removed = np.flatnonzero(seen & ~r.keep)
        seen &= r.keep
        show = rng.choice(removed, size=min(n, len(removed)), replace=False) if len(removed) else []
        titles = [r.reasons[i].split(": ", 1)[-1] + (f"\n[{cands.labels[i]['label']}]" if cands.labels else "")
                  for i in show]
        image_grid([overlay(cands.images[i], cands.poses[i], 128) for i in show], titles, ncols=10,
                   path=path_of(f"removed_{r.name}"), suptitle=f"removed by stage '{r.name}' ({len(removed)})")
    kept = np.flatnonzero(seen)
    show = rng.choice(kept, size=min(n, len(kept)), replace=False)
    image_grid([overlay(cands.images[i], cands.poses[i], 128) for i in show],
               [cands.labels[i]["label"] if cands.labels else "" for i in show], ncols=10,
               path=path_of("kept"), suptitle="kept (with the keypoint file drawn)")


def conditioning_inputs(images: np.ndarray, poses: np.ndarray, grid: np.ndarray, maps: np.ndarray,
                        path=None) -> Any:
    """What a diffusion model is given for each pose: the image with its skeleton, the original ``grid`` context
    (17 values per pose) as bars, and the ``skeleton`` maps at latent resolution (summed over channels)."""
    plt = _plt()
    k = len(images)
    fig, axes = plt.subplots(3, k, figsize=(9, 6.6), squeeze=False)
    for i in range(k):
        axes[0, i].imshow(overlay(images[i], poses[i], 128))
        axes[0, i].axis("off")
        axes[1, i].bar(range(len(grid[i])), grid[i])
        axes[1, i].set_title(f"grid context ({len(grid[i])} values)", fontsize=7)
        axes[1, i].tick_params(labelsize=5)
        axes[2, i].imshow(maps[i], cmap="magma")
        axes[2, i].axis("off")
        axes[2, i].set_title(f"skeleton maps {maps.shape[-1]}x{maps.shape[-1]}", fontsize=7)
    fig.tight_layout()
    return save(fig, path)


def guidance_sweep(sweep: Mapping[Any, Mapping[str, float]], ceiling_pck: float, interval: Sequence[int] | None,
                   n: int, path=None) -> Any:
    """PCK@0.1 (beside the estimator's ceiling) and FID of ``n`` samples against the classifier-free guidance
    scale; ``sweep`` = {scale: {"pck@0.1", "fid"}}, ``interval`` the timesteps the scale applies at (None: all)."""
    plt = _plt()
    label = "guidance scale" + (f" (at {interval[0]} <= t < {interval[1]})" if interval else "")
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(8, 3))
    ax.plot(list(sweep), [v["pck@0.1"] for v in sweep.values()], "o-")
    ax.axhline(ceiling_pck, ls="--", c="grey", label="estimator ceiling")
    ax.set_xlabel(label)
    ax.set_ylabel("PCK@0.1")
    ax.legend(fontsize=7)
    ax2.plot(list(sweep), [v["fid"] for v in sweep.values()], "o-", c="C1")
    ax2.set_xlabel(label)
    ax2.set_ylabel(f"FID ({n} samples, lower is better)")
    fig.tight_layout()
    return save(fig, path)


def code_grids(images: np.ndarray, poses: np.ndarray, pose_tokens: np.ndarray, codes: np.ndarray,
               decoded: np.ndarray, path=None) -> Any:
    """The transformer's view of each image: the image with its pose (the first pose tokens as title), its grid of
    VQ code indices (numbered when the grid has at most 16 cells) and those codes decoded."""
    plt = _plt()
    k = len(images)
    h, w = codes.shape[1:]
    fig, axes = plt.subplots(3, k, figsize=(1.8 * k, 5.6), squeeze=False)
    for i in range(k):
        axes[0, i].imshow(overlay(images[i], poses[i], 128))
        axes[0, i].set_title(f"pose tokens {np.asarray(pose_tokens)[i, :3].tolist()}...", fontsize=6)
        axes[1, i].imshow(codes[i], cmap="tab20", interpolation="nearest")
        if h * w <= 16:
            for (y, x), c in np.ndenumerate(codes[i]):
                axes[1, i].text(x, y, str(c), ha="center", va="center", fontsize=6)
        axes[1, i].set_title(f"{h}x{w} code indices", fontsize=7)
        axes[2, i].imshow(decoded[i])
        axes[2, i].set_title("its codes decoded", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return save(fig, path)


def loss_with_levels(history: Sequence[Mapping[str, float]], levels: Mapping[str, float], path=None,
                     ylabel: str = "loss") -> Any:
    """The training loss of ``history`` (rows with ``step`` and ``loss``) against the step, with a horizontal line
    per named level (e.g. the held-out loss), labelled with its value."""
    plt = _plt()
    rows = [r for r in history if "loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1, label="train")
    for k, (name, value) in enumerate(levels.items()):
        ax.axhline(value, c=f"C{k + 1}" if k < 2 else "grey", ls=("--", ":", "-.")[min(k, 2)],
                   label=f"{name} {value:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save(fig, path)
