"""The transformer's code-by-code row (kpnb.run.snapshots) on a tiny untrained transformer and a VQ stand-in."""
import numpy as np
import torch
from test_transformer import N_CODES, poses, tiny

from kpnb.models import transformer as T
from kpnb.run.snapshots import code_snapshots


class CodeVQ(torch.nn.Module):
    """decode_indices: each code index as a grey level, 2x nearest upsampling."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    def decode_indices(self, codes):
        x = codes.float()[:, None].repeat(1, 3, 1, 1) / N_CODES * 2 - 1
        return torch.nn.functional.interpolate(x, scale_factor=2.0)


def test_code_snapshots_fill_the_codes_not_drawn_yet():
    m, vq, p = tiny(), CodeVQ(), poses(1)
    row = code_snapshots(m, vq, p, fill_code=5, n_snapshots=3, seed=4, top_k=8)
    assert row.shape == (3, 4, 6, 3) and row.dtype == np.uint8  # the 2x3 code grid at steps 0, 2 and 5 of 6
    codes = T.sample_codes(m, p, seed=4, top_k=8).view(1, 6)
    for image, drawn in zip(row, (1, 3, 6)):
        grid = torch.full((1, 6), 5, dtype=torch.long)
        grid[0, :drawn] = codes[0, :drawn]
        np.testing.assert_array_equal(image, T.decode_codes(vq, grid.view(1, 2, 3))[0])
    np.testing.assert_array_equal(row[-1], T.decode_codes(vq, codes.view(1, 2, 3))[0])  # the last is the sample
