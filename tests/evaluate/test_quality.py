"""FID/KID through torchmetrics with kpnb's feature networks, and diversity, on hand-made image sets."""
import numpy as np
import pytest
import torch
from torch import nn

from kpnb.evaluate import quality
from kpnb.poses import analysis as pose_analysis
from kpnb.poses.pose import HIDDEN, OUTSIDE, VISIBLE


class TinyFeatures(nn.Module):
    """A fixed random conv net: a feature space where colour and layout show."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.num_features = 32
        self.name = "tiny"

    @torch.no_grad()
    def forward(self, x):
        return self.net(x.float() / 255.0)


def images(n, seed, shift=0):
    """Flat backgrounds of random colour with a brighter square figure, and a little noise."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 160, (n, 1, 1, 3)) + rng.integers(0, 20, (n, 16, 16, 3))
    base[:, 4:12, 4:12] += 60
    return np.clip(base + shift, 0, 255).astype(np.uint8)


def test_fid_of_a_set_against_itself_is_about_zero_and_grows_with_a_shift():
    real = images(200, 0)
    d = quality.ImageDistance(real, TinyFeatures(), kid_subset_size=50, kid_subsets=20)
    same = d.score(real)
    assert abs(same["fid"]) < 1e-6 and abs(same["kid"]) < 1e-3 and same["n_fake"] == 200
    other = d.score(images(200, 1))           # the same distribution, other draws: small
    shifted = d.score(images(200, 1, shift=80))
    assert shifted["fid"] > 10 * other["fid"] > 0 and shifted["kid"] > other["kid"]
    assert d.score(images(200, 1, shift=80)) == shifted  # deterministic, KID subsets included
    assert d.n_real == 200 and d.name == "tiny"


def test_clip_features_path(tmp_path):
    from kpnb.models import clip

    model = clip.create_domain_clip(clip.domain_clip_config(image_size=16, patch_size=8, width=32, layers=1),
                                    tmp_path / "clip")
    f = quality.ClipFeatures(model)
    out = f(torch.from_numpy(images(3, 0)).permute(0, 3, 1, 2))
    assert out.shape == (3, f.num_features) and torch.isfinite(out).all()
    d = quality.ImageDistance(images(20, 0), f, kid_subset_size=10, kid_subsets=5)
    assert d.score(images(20, 0, shift=80))["fid"] > d.score(images(20, 0))["fid"]


def test_inception_needs_its_local_file_and_says_what_to_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05") as e:
        quality.inception_features(tmp_path / "missing.pth")
    assert str(tmp_path / "missing.pth") in str(e.value) and "nothing is downloaded" in str(e.value)


def _random_inception_file(path):
    """A weights file with the real network's layout and random values (the path is what is tested):
    torch-fidelity's network built with its loading patched out, its random state saved."""
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as fe

    torch.manual_seed(0)
    with mock.patch.object(fe, "load_state_dict_from_url", return_value={}), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", return_value=None):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(net.state_dict(), path)
    return path


def test_inception_from_a_local_file(tmp_path):
    pytest.importorskip("torch_fidelity")
    path = _random_inception_file(tmp_path / quality.INCEPTION_FILE)
    net = quality.inception_features(path)
    out = net(torch.from_numpy(images(2, 0)).permute(0, 3, 1, 2))
    assert out.shape == (2, 2048) and torch.isfinite(out).all()
    d = quality.ImageDistance(images(12, 0), net, kid_subset_size=6, kid_subsets=3)
    assert d.name.startswith("Inception-v3") and np.isfinite(d.score(images(12, 1))["fid"])


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note while it refuses the file
def test_an_inception_file_that_runs_code_is_refused(tmp_path):
    import pickle

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"w": Payload()}))
    with pytest.raises(ValueError, match="evil.pth"):
        quality.inception_features(path)


def test_diversity_tells_the_same_character_from_varied_ones():
    rng = np.random.default_rng(0)
    pose = np.zeros((17, 3)); pose[:, :2] = rng.uniform(0.3, 0.7, (17, 2)); pose[:, 2] = VISIBLE
    real_poses = np.repeat(pose[None], 30, 0)
    real_poses[:, :, :2] += rng.normal(0, 0.05, (30, 17, 2)) * np.linspace(0, 3, 30)[:, None, None]
    real = images(30, 3)
    same = np.repeat(images(1, 4), 8, 0)
    out = quality.diversity(TinyFeatures(), same, real, real_poses, pose)
    assert out["samples"] == pytest.approx(0.0, abs=1e-6) and out["real"] > 0 and out["ratio"] < 0.01
    varied = quality.diversity(TinyFeatures(), images(8, 5), real, real_poses, pose)
    assert varied["ratio"] > 0.5
    idx = pose_analysis.nearest_as_placed(pose, real_poses, 5)
    assert list(idx) == [0, 1, 2, 3, 4]  # the least disturbed poses are the nearest


def test_nearest_as_placed_counts_joints_in_the_frame_in_both():
    rng = np.random.default_rng(1)
    pose = np.zeros((17, 3)); pose[:, :2] = rng.uniform(0.3, 0.7, (17, 2)); pose[:, 2] = VISIBLE
    poses = np.repeat(pose[None], 4, 0)
    poses[0, :, 0] += 0.2                                 # everywhere 0.2 off
    poses[1, :, 0] += 0.1; poses[1, :, 2] = HIDDEN        # hidden joints count: 0.1 off
    poses[2, :13, 2] = OUTSIDE                            # on the pose, but 4 joints in the frame: never near
    poses[3, 0, 0] += 1.0                                 # 1.0 off at one joint of 17
    assert list(pose_analysis.nearest_as_placed(pose, poses, 4)) == [3, 1, 0, 2]
    assert list(pose_analysis.nearest_as_placed(pose, poses, 2)) == [3, 1]
    # not the fitted search, where a shifted copy is no distance at all
    assert pose_analysis.nearest_poses([pose], poses[:1])["distance"][0] == pytest.approx(0.0, abs=1e-6)


def test_image_checks_name_the_argument_and_what_was_found():
    with pytest.raises(ValueError, match=r"real images: expected uint8 .* uint8 \[8, 8, 3\]"):
        quality.ImageDistance(np.zeros((8, 8, 3), np.uint8), TinyFeatures())
    dist = quality.ImageDistance(images(4, 0), TinyFeatures())
    with pytest.raises(ValueError, match=r"generated images: expected uint8 .* float32 \[2, 8, 8, 3\]"):
        dist.score(np.zeros((2, 8, 8, 3), np.float32))


def test_head_boxes_follow_the_head_and_skip_poses_without_one():
    p = np.zeros((3, 17, 3))
    p[..., 2] = VISIBLE
    p[0, :5, :2] = [[0.5, 0.2], [0.52, 0.18], [0.48, 0.18], [0.55, 0.2], [0.45, 0.2]]  # head at the top middle
    p[1, :5, :2] = [[0.02, 0.02], [0.03, 0.01], [0.01, 0.01], [0.04, 0.02], [0.0, 0.02]]  # in the corner
    p[2, :5, 2] = 3  # OUTSIDE: no head in the frame
    b = quality.head_boxes(p)
    # side max(0.2, 2.5 x the 0.1 extent) = 0.25 around the centre (0.5, 0.19)
    assert b[0] == pytest.approx([0.375, 0.065, 0.625, 0.315])
    assert (b[1, :2] >= 0).all() and np.isnan(b[2]).all()
    im = np.zeros((2, 40, 40, 3), np.uint8)
    im[0, 4:12, 16:24] = 255  # a white head where box 0 is
    crops = quality.crop_boxes(np.concatenate([im, im[:1]]), b, size=8)
    assert crops.shape == (2, 8, 8, 3) and crops[0].mean() > 100 and crops[1].mean() < 50
