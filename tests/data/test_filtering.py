import numpy as np
import pytest

from kpnb import synth
from kpnb.data import filtering
from kpnb.data import folder as data


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    synth.write_dataset(root, n=160, image_size=64, render_size=128, seed=3, workers=1, progress=False)
    return data.load_candidates(root, 64, progress=False)


def test_chain_precision_recall_on_generated_pool(pool):
    results = filtering.run_chain(pool, [filtering.stage_tags, filtering.stage_image, filtering.stage_pose])
    rep = filtering.report(pool, results)
    assert rep["n_candidates"] == 160
    assert rep["precision"] >= 0.9, rep
    assert rep["recall"] >= 0.85, rep
    # no single stage does the whole job: each alone keeps clearly more distractors than the chain
    for r in results:
        assert rep[f"{r.name}.precision_alone"] < rep["precision"]
    # the report's bookkeeping adds up
    assert sum(rep[f"{r.name}.removed_in_chain"] for r in results) == rep["n_candidates"] - rep["n_kept"]


def test_image_stage_on_hand_made_images():
    rng = np.random.default_rng(0)
    colourful = rng.integers(0, 255, (64, 64, 3)).astype(np.uint8)
    bordered = np.zeros((64, 64, 3), np.uint8)
    bordered[24:40, 24:40] = colourful[24:40, 24:40]
    grey = np.repeat(rng.integers(0, 255, (64, 64, 1)), 3, -1).astype(np.uint8)
    comic = np.full((64, 64, 3), 255, np.uint8)
    for y0, y1 in ((4, 30), (34, 60)):       # two stacked panels with black frames, coloured inside
        comic[y0:y1, 4:60] = 0
        comic[y0 + 1:y1 - 1, 5:59] = colourful[y0 + 1:y1 - 1, 5:59]

    class C:
        images = np.stack([colourful, bordered, grey, comic])

    r = filtering.stage_image(C)
    assert list(r.keep) == [True, False, False, False]
    assert r.reasons[1:] == ["image: black border", "image: monochrome", "image: comic panels"]


def test_tag_stage_and_clip_hook():
    class C:
        meta = [{"tag_names": ["1girl", "solo"], "rating": "s"}, {"tag_names": ["comic"], "rating": "s"},
                {"tag_names": ["1girl"], "rating": "e"}]
        images = np.zeros((3, 8, 8, 3), np.uint8)

    r = filtering.stage_tags(C)
    assert list(r.keep) == [True, False, False]
    assert r.reasons[1] == "tag: comic" and r.reasons[2] == "rating explicit"
    c = filtering.stage_clip(C, lambda ims: np.array([0.9, 0.2, 0.5]), min_score=0.5)
    assert list(c.keep) == [True, False, True]


def test_image_features_in_blocks_equal_one_pass():
    # the blocks bound memory on big shards; per-image numbers must not depend on them
    rng = np.random.default_rng(0)
    ims = (rng.random((filtering.IMAGE_CHUNK * 2 + 5, 24, 24, 3)) * 255).astype(np.uint8)
    ims[3, :4] = 0  # a black border on one image
    blocked, whole = filtering.image_features(ims), filtering._image_features(ims)
    assert set(blocked) == set(whole)
    for k in whole:
        np.testing.assert_array_equal(blocked[k], whole[k])


def test_strict_keeps_only_whole_unoccluded_figures():
    from kpnb.poses.pose import HIDDEN, MISSING, OUTSIDE, VISIBLE
    p = np.zeros((4, 17, 3), np.float32)
    p[..., :2], p[..., 2] = 0.5, VISIBLE
    p[1, 15, 2] = OUTSIDE   # an ankle out of the frame: a crop
    p[2, 3, 2] = HIDDEN     # the far ear hidden
    p[3, 9, 2] = MISSING
    assert filtering.strict_keep(p).tolist() == [True, False, False, False]
