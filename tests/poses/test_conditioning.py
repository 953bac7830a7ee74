"""Keypoint encoders: shapes, the faithful grid axis order, flip consistency, nulls, bad input."""
import numpy as np
import pytest
import torch

from kpnb.poses import conditioning as C
from kpnb.poses.pose import FLIP_PERM, HIDDEN, MISSING, OUTSIDE, VISIBLE, Pose, PoseError, flip, grid_tokens


def random_poses(n, seed=0, edges=True):
    """Poses with every visibility code, coordinates partly outside, and (``edges``) the frame-edge cases
    x = 0 and x = 1, where the half-open frame [0, 1) makes a mirror change a joint's in/out status."""
    rng = np.random.default_rng(seed)
    arr = np.zeros((n, 17, 3), np.float32)
    for i in range(n):
        xy = rng.uniform(0.05, 0.95, (17, 2)).astype(np.float32)
        vis = rng.choice([VISIBLE, VISIBLE, HIDDEN, MISSING], 17).astype(np.int8)
        xy[vis == MISSING] = 0
        k = rng.integers(0, 17)
        if vis[k] != MISSING:
            xy[k] = (rng.uniform(1.05, 1.4), rng.uniform(0.1, 0.9))
        arr[i] = Pose(xy, vis).refresh_outside().to_array()
    if not edges:
        return torch.from_numpy(arr)
    arr[0, 3, :] = (0.0, 0.5, VISIBLE)    # lands on x = 1 after a flip: outside
    arr[0, 4, :] = (1.0, 0.5, OUTSIDE)    # comes back to x = 0: inside
    return torch.from_numpy(arr)


def test_modes_and_shapes():
    p = random_poses(3)
    for modes, ctx, cat in [({"grid"}, (3, 1, 17), None), ({"tokens"}, (3, 17, 32), None),
                            ({"skeleton"}, None, (3, 33, 8, 8)), ("tokens+skeleton", (3, 17, 32), (3, 33, 8, 8)),
                            ("grid,skeleton", (3, 1, 17), (3, 33, 8, 8))]:
        enc = C.PoseConditioner(modes, latent_size=8, token_dim=32)
        out = enc(p)
        assert (None if out.context is None else tuple(out.context.shape)) == ctx, modes
        assert (None if out.concat is None else tuple(out.concat.shape)) == cat, modes
        assert enc.context_dim == (None if ctx is None else ctx[-1])
        assert enc.concat_channels == (0 if cat is None else 33)
    with pytest.raises(ValueError, match="pick one"):
        C.PoseConditioner({"grid", "tokens"}, 8)
    with pytest.raises(ValueError, match="valid modes"):
        C.parse_modes("heatmap")


def test_grid_is_the_original_transposed_tokeniser():
    # joint at x = 0.25, y = 0.75 of the 512 frame: x_cell 8, y_cell 24; the original's token is y + 32 x
    xy = np.full((17, 2), 0.5, np.float32)
    xy[9] = (0.25, 0.75)
    pose = Pose(xy, np.full(17, VISIBLE, np.int8))
    ctx = C.grid_context(torch.from_numpy(pose.to_array())[None])
    assert ctx.shape == (1, 1, 17)
    assert ctx[0, 0, 9].item() == 24 + 32 * 8
    assert np.array_equal(ctx[0, 0].numpy(), grid_tokens(pose, faithful_axes=True).astype(np.float32))


def test_flip_poses_matches_keypoints_flip():
    p = random_poses(20, seed=1)
    got = C.flip_poses(p).numpy()
    for i in range(len(p)):
        want = flip(Pose.from_array(p[i].numpy())).to_array()
        np.testing.assert_allclose(got[i], want, atol=1e-6)
    assert got[0, FLIP_PERM[3], 2] == OUTSIDE and got[0, FLIP_PERM[4], 2] == VISIBLE


def test_skeleton_flip_consistency():
    p = random_poses(6, seed=2, edges=False)
    enc = C.PoseConditioner({"skeleton"}, latent_size=16)
    a = enc(C.flip_poses(p)).concat
    b = C.flip_maps(enc(p).concat)
    assert a.abs().max() > 0.5  # something is drawn
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_skeleton_amplitudes():
    xy = np.full((17, 2), 0.5, np.float32)
    vis = np.full(17, VISIBLE, np.int8)
    xy[0], xy[1], vis[2], xy[2] = (0.15625, 0.40625), (0.8, 0.2), MISSING, 0  # nose on pixel (2, 6) of 16
    vis[1] = HIDDEN
    m = C.skeleton_maps(torch.from_numpy(Pose(xy, vis).to_array())[None], 16)[0]
    assert m.shape == (33, 16, 16)
    assert torch.argmax(m[0]).item() == 6 * 16 + 2 and abs(m[0].max().item() - 1.0) < 1e-5
    assert abs(m[1].max().item() - 0.5) < 0.05       # hidden: half amplitude
    assert m[2].abs().max().item() == 0.0            # missing: nothing
    limb = [i for i, l in enumerate(C.LIMBS) if set(l) == {2, 0}][0]
    assert m[17 + limb].abs().max().item() == 0.0   # a limb to a missing joint is not drawn


def test_tokens_swap_under_flip():
    enc = C.PoseConditioner({"tokens"}, latent_size=8, token_dim=16)
    with torch.no_grad():
        enc.joint_emb.weight.zero_()  # tokens then depend on (x, y, vis) only
    p = random_poses(4, seed=3)
    p[:, :, 2] = torch.where(p[:, :, 2] == OUTSIDE, torch.tensor(float(VISIBLE)), p[:, :, 2])
    p[:, :, :2] = p[:, :, :2].clamp(0.05, 0.95)
    mirrored = p.clone()
    mirrored[..., 0] = torch.where(p[..., 2] != MISSING, 1 - p[..., 0], p[..., 0])
    a = enc.encode_tokens(C.flip_poses(p))
    b = enc.encode_tokens(mirrored)[:, FLIP_PERM]
    torch.testing.assert_close(a, b)
    # and the joint embedding does tell joints apart
    enc2 = C.PoseConditioner({"tokens"}, latent_size=8, token_dim=16)
    same = torch.zeros(1, 17, 3)
    same[..., 2] = VISIBLE
    t = enc2.encode_tokens(same)
    assert (t[0, 9] - t[0, 10]).abs().max() > 1e-3


def test_tokens_missing_ignores_coordinates_outside_keeps_them():
    enc = C.PoseConditioner({"tokens"}, latent_size=8, token_dim=16)
    p = torch.zeros(2, 17, 3)
    p[..., 2] = MISSING
    p[1, :, :2] = 0.7
    t = enc.encode_tokens(p)
    torch.testing.assert_close(t[0], t[1])
    p[..., 2] = OUTSIDE
    p[0, :, 0] = 1.3
    t = enc.encode_tokens(p)
    assert (t[0] - t[1]).abs().max() > 1e-3


def test_drop_uses_learned_nulls_per_sample():
    enc = C.PoseConditioner("tokens+skeleton", latent_size=8, token_dim=16)
    with torch.no_grad():
        enc.null_map.fill_(0.3)
    p = random_poses(3, seed=4)
    drop = torch.tensor([True, False, True])
    out, ref = enc(p, drop), enc(p)
    torch.testing.assert_close(out.context[1], ref.context[1])
    torch.testing.assert_close(out.concat[1], ref.concat[1])
    torch.testing.assert_close(out.context[0], enc.null_tokens[0])
    assert torch.all(out.concat[2] == 0.3)
    nul = enc.null(2)
    torch.testing.assert_close(nul.context[0], out.context[0])
    g = C.PoseConditioner("grid", latent_size=8)
    assert torch.equal(g(p, drop).context[0], g.null_grid[0])


def test_flip_batch_flips_only_selected():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    p = random_poses(2, seed=5)
    fx, fp = C.flip_batch(x, p, torch.tensor([True, False]))
    assert torch.equal(fx[0], x[0].flip(-1)) and torch.equal(fx[1], x[1])
    assert torch.equal(fp[0], C.flip_poses(p)[0]) and torch.equal(fp[1], p[1])


@pytest.mark.parametrize("bad, match", [
    (np.zeros((2, 16, 3)), r"shape \[B, 17, 3\]"),
    (np.zeros((2, 17)), r"shape"),
    ("nose", r"cannot read|shape"),
])
def test_check_poses_shape_errors(bad, match):
    with pytest.raises(PoseError, match=match):
        C.check_poses(bad)


def test_check_poses_value_errors_name_the_joint():
    p = np.zeros((2, 17, 3), np.float32)
    p[..., 2] = VISIBLE
    q = p.copy()
    q[1, 9, 0] = np.nan
    with pytest.raises(PoseError, match=r"sample 1, joint 'wrist_left'.*not finite"):
        C.check_poses(q)
    q = p.copy()
    q[0, 16, 2] = 5
    with pytest.raises(PoseError, match=r"ankle_right.*visibility code.*5"):
        C.check_poses(q)
    q[0, 16, 2] = 1.5
    with pytest.raises(PoseError, match="visibility code"):
        C.check_poses(q)
    assert C.check_poses(p[0]).shape == (1, 17, 3)
    assert C.check_poses([Pose.from_array(p[0])] * 3).shape == (3, 17, 3)


def test_mask_joints_as_a_person_annotates():
    p = random_poses(400, seed=7, edges=False)
    u = torch.rand(400, 17, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(C.mask_joints(p, u, 0.0), p)
    gone = C.mask_joints(p, u, 1.0)
    assert (gone[..., 2] == MISSING).all() and (gone[..., :2] == 0).all()
    m = C.mask_joints(p, u, 0.25)
    vis, new = p[..., 2], m[..., 2]
    labelled = vis != MISSING
    share = (new[labelled] == MISSING).float().mean().item()
    assert 0.2 < share < 0.3, share
    # a joint is only ever made missing or (from visible) hidden; a missing one has no coordinates
    changed = new != vis
    assert ((new[changed] == MISSING) | ((new[changed] == HIDDEN) & (vis[changed] == VISIBLE))).all()
    assert (m[..., :2][new == MISSING] == 0).all()
    assert torch.equal(m[~changed], p[~changed])
    hidden = ((new == HIDDEN) & (vis == VISIBLE)).sum() / (vis == VISIBLE).sum()
    assert 0.12 < hidden.item() < 0.25  # 0.25 of the visible joints not made missing: about 0.19
