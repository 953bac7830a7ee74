"""Palettes, the kinds of character, pose, background and distractor, and the body model's
proportions: the constants every part of the synthetic dataset shares."""
from __future__ import annotations

import numpy as np

SYNTH_VERSION = 3   # bump when the output changes, so cached datasets are redrawn
ID_BASE = 100000

# ---- palettes -----------------------------------------------------------------------------------------
# Hair colours are few and far apart so that a classifier (and CLIP) can tell them apart at 64x64.
HAIR_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 44, 48), "blue": (46, 92, 216), "green": (52, 166, 72), "pink": (250, 138, 192),
    "purple": (134, 70, 196), "blonde": (250, 214, 92), "black": (38, 32, 44), "white": (238, 238, 246),
}
# No black outfit: black hair + black dress + grey background would read as a monochrome image.
OUTFIT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (204, 40, 52), "blue": (48, 88, 204), "green": (44, 150, 84), "yellow": (246, 204, 52),
    "pink": (242, 132, 178), "purple": (128, 68, 182), "white": (246, 246, 246), "orange": (246, 140, 40),
}
SHIRT_COLOURS = {"white": (248, 248, 248), "black": (48, 46, 56), "light_blue": (172, 204, 242),
                 "grey": (170, 170, 178)}
EYE_COLOURS = {"blue": (36, 108, 232), "green": (36, 168, 88), "red": (212, 36, 48), "purple": (142, 66, 204),
               "brown": (128, 78, 38), "yellow": (232, 182, 28), "aqua": (36, 196, 206)}
SKIN_TONES = [(255, 229, 212), (252, 219, 197), (246, 206, 181), (232, 188, 158)]
SHOE_COLOURS = {"brown": (112, 70, 40), "black": (42, 40, 46), "red": (192, 40, 44), "white": (240, 240, 242)}
LEGWEAR_COLOURS = {"black": (44, 42, 52), "white": (246, 246, 250)}
ACCENT_COLOURS = [(224, 40, 56), (40, 80, 200), (250, 210, 60), (250, 250, 250), (250, 150, 190)]
# Backgrounds are light or mid tones: never near-black (the border filter looks for black rows).
BACKGROUND_COLOURS = {
    "yellow": (250, 234, 150), "sky_blue": (160, 210, 246), "mint": (172, 232, 202), "pink": (250, 202, 218),
    "lavender": (212, 196, 246), "peach": (250, 212, 178), "grey": (186, 188, 196), "white": (248, 248, 248),
    "orange": (250, 190, 118), "blue": (108, 148, 220), "green": (140, 200, 118), "brown": (176, 140, 110),
}

HAIR_STYLES = ("short", "long", "twintails", "ponytail", "bangs")
OUTFITS = ("dress", "top_skirt")
SLEEVES = ("none", "short", "long")
FACINGS = ("front", "left", "right")      # left/right: the side of the IMAGE the character turns towards
FRAMINGS = ("full_body", "cowboy_shot", "upper_body")
POSE_KINDS = ("standing", "walking", "sitting", "arms_up", "arms_out", "arms_crossed", "waving", "kneeling",
              "crouching", "lying")
BACKGROUND_KINDS = ("plain", "gradient", "stripes", "dots", "floor")
DISTRACTOR_KINDS = ("multiple", "scenery", "comic", "sketch", "border", "estimator_failure", "rating")
# Shares among distractors; 'rating' (an otherwise normal image rated explicit) is ~3% of all at 0.4.
DISTRACTOR_SHARES = {"multiple": 0.18, "scenery": 0.14, "comic": 0.14, "sketch": 0.14, "border": 0.14,
                     "estimator_failure": 0.185, "rating": 0.075}
LABELS = ("suitable",) + DISTRACTOR_KINDS
TAG_NOISE = {"drop_revealing": 0.35, "wrong_revealing": 0.03, "drop_attribute": 0.06}
KEYPOINT_JITTER = 0.007  # std of the "estimator" noise on plausible keypoint files, in frame units

# ---- the body model (body height = 1; x = character's left, y = down, z = towards the viewer) -----------
_R = 0.115                                   # head radius: the head is about a quarter of the body height
_HEAD_C = np.array([0.0, 0.13, 0.0])
_EYE = np.array([0.045, 0.02, 0.085])        # left eye relative to the head centre (the right one mirrored)
_NOSE = np.array([0.0, 0.055, 0.10])
_EAR = np.array([0.105, 0.0, 0.0])
_SHOULDER = np.array([0.085, 0.285, 0.0])
_HIP = np.array([0.06, 0.53, 0.0])
_LEN = {"ua": 0.15, "fa": 0.13, "th": 0.21, "sn": 0.20}
# Ratios the painter uses to recover the head from any 17 points (in head radii): consistent with the model.
_K_TORSO = _R / float(_HIP[1] - _SHOULDER[1])          # head radius per torso length
_K_NECK = float(_SHOULDER[1] - _HEAD_C[1]) / _R         # head centre to shoulder midpoint
_K_SH, _K_HIP = float(_SHOULDER[0]) / _R, float(_HIP[0]) / _R
_K_EYE_X, _K_EYE_Z = float(_EYE[0]) / _R, float(_EYE[2]) / _R
_K_EAR = float(_EAR[0]) / _R
_K_NOSE_Z = float(_NOSE[2]) / _R
