"""The embedded procedural dataset: anime-style characters drawn from a pose and attributes, labelled
distractors and noisy Danbooru-style tags, written in the layout of the Danbooru pose-keypoint release.

Why procedural: the workbook must run offline on 2 CPU cores, so it cannot download Danbooru. Every image here
is drawn from a known pose, so the truth is exact (for the pose estimator and PCK), every candidate carries a
ground-truth label (so the filter's precision and recall can be measured) and a caption (for the domain CLIP).

* :func:`sample_attributes` and :func:`sample_pose` draw a character: hair colour and style, outfit, eyes,
  background, facing; and a pose from a small 3-D kinematic skeleton with anime proportions (a head about a
  quarter of the body height), projected with a yaw (3/4 views) and framed (full body, cowboy shot, upper body,
  off-centre, scaled). A share of the poses is wider: kneeling, crouching, lying, free arms, bent and tilted
  bodies, near-side views, more real proportions, a side cut by the frame. Joints outside the frame keep their
  coordinates and are marked OUTSIDE.
* :func:`render_character` paints a character for ANY pose (also a user's, with missing or outside joints):
  everything is derived from the 17 positions alone, so the keypoints sit exactly on the drawn joints.
* :func:`make_candidate` makes one dataset entry: a suitable image or a distractor (``multiple``, ``scenery``,
  ``comic``, ``sketch``, ``border``, ``estimator_failure``, ``rating``), the keypoint file a pose estimator
  would have written for it (plausible for suitable images, mixed/garbage/scrambled for most distractors),
  Danbooru2021-shaped metadata whose tags are noisy on purpose (a share of distractors lacks the revealing
  tag, a few suitable images carry a wrong one), and the ground-truth label.
The parts: :mod:`.palette` (shared constants), :mod:`.characters` (attributes and poses), :mod:`.painter`
(drawing, with :mod:`.shapes`, :mod:`.head` and :mod:`.body`), :mod:`.scenes` (distractor scenes and
estimator-like keypoint files), :mod:`.tags` (metadata and captions), :mod:`.dataset` (candidates and the writer),
:mod:`.renders` (exact renders of given or sampled poses: the truth the pose estimator learns from and is
measured on).

* :func:`write_dataset` writes ``images/<id>.png``, ``keypoints/<id>.json``, ``metadata.jsonl``,
  ``labels.jsonl`` and ``dataset.json`` with worker processes; a rerun with the same settings does nothing.

Every image comes from its own ``np.random.default_rng([seed, index])``, so any number of workers gives the
same bytes. Left is the character's own left: facing the viewer, her left shoulder is on the image's right.

The layer serves notebook 01 (the candidate pool) and, through its renders and vocabulary (hair and outfit
colours), the pose estimator and the attribute classifier of notebooks 04 to 06; that is why it sits below
:mod:`kpnb.models`. May import :mod:`kpnb.core` and :mod:`kpnb.poses`.
"""
from kpnb.synth.characters import framing_of, sample_attributes, sample_pose
from kpnb.synth.dataset import _sample_label, main, make_candidate, write_dataset
from kpnb.synth.painter import _background, render_character
from kpnb.synth.palette import (
           BACKGROUND_KINDS,
           DISTRACTOR_KINDS,
           DISTRACTOR_SHARES,
           FACINGS,
           FRAMINGS,
           HAIR_COLOURS,
           HAIR_STYLES,
           ID_BASE,
           LABELS,
           OUTFIT_COLOURS,
           POSE_KINDS,
           SYNTH_VERSION,
)
from kpnb.synth.tags import REVEALING_TAGS, caption_of, tag_id

__all__ = ["HAIR_COLOURS", "OUTFIT_COLOURS", "HAIR_STYLES", "DISTRACTOR_KINDS", "DISTRACTOR_SHARES", "LABELS",
           "POSE_KINDS", "FACINGS", "FRAMINGS", "sample_attributes", "sample_pose", "framing_of",
           "render_character", "make_candidate", "write_dataset", "caption_of", "tag_id", "main"]
