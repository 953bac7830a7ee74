"""Small helpers several test files share (importable: pytest puts this folder on sys.path for conftest.py)."""
import numpy as np
import torch

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
