"""Small helpers several test files share (importable: pytest puts this folder on sys.path for conftest.py)."""
import subprocess
import sys
from contextlib import contextmanager

import numpy as np
import torch

from kpnb.diffusion import ldm as ldm_model
from kpnb.original import ldm as original_ldm
from kpnb.poses.pose import VISIBLE


def leaves(d, prefix=""):
    """A nested settings dict as {"section.key.sub": value}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def random_poses(n, seed=0):
    """``n`` poses [n, 17, 3] with every joint VISIBLE somewhere inside the frame."""
    rng = np.random.default_rng(seed)
    p = np.zeros((n, 17, 3), np.float32)
    p[..., :2] = rng.uniform(0.1, 0.9, (n, 17, 2))
    p[..., 2] = VISIBLE
    return torch.from_numpy(p)


# the UNet of a small model in the released checkpoint's layout (tests of kpnb.original and the released model)
UCFG = dict(in_channels=3, out_channels=3, base=32, mults=(1, 2), num_res_blocks=1, attn_ds=(2,), heads=2,
            context_dim=17)


def exported_checkpoint(path, seed=0):
    """A small kpnb grid-mode LDM and taming-layout VQ written by original.save_original_ldm: (path, ldm, vq)."""
    from kpnb.models.vq import VQConfig, VQModel
    from kpnb.poses.conditioning import PoseConditioner

    torch.manual_seed(seed)
    vq = VQModel(VQConfig(factor=4, image_size=16, latent_channels=3, n_codes=16, base_width=64,
                          channel_mult=(1, 2, 2), res_blocks=1, dec_res_blocks=2, quant_conv=True)).eval()
    cond = PoseConditioner("grid", latent_size=4)
    ldm = ldm_model.KeypointLDM(ldm_model.UNetConfig(**UCFG), cond, (3, 4, 4), 0.7).eval()
    with torch.no_grad():
        for p in ldm.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return original_ldm.save_original_ldm(ldm, vq, path, step=42), ldm, vq


# ---- run-folder locks held by other processes ----------------------------------------------------------
HOLD = ("import sys, time\nfrom kpnb.core.lock import FolderLock\nFolderLock(sys.argv[1], sys.argv[2]).acquire()\n"
        "print('held', flush=True)\ntime.sleep(120)")


@contextmanager
def other_holder(folder, command="holder under test"):
    """Another process holding ``folder``'s lock while the block runs (killed after it: no release)."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), command], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        yield p
    finally:
        p.kill()
        p.wait()
        p.stdout.close()


def dead_pid():
    """The PID of a process that has finished (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid
