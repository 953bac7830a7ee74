"""Danbooru2021-shaped tags, metadata and captions, noisy on purpose (a share of distractors lacks the
revealing tag, a few suitable images carry a wrong one)."""
from __future__ import annotations

import zlib
from typing import Any, Sequence

import numpy as np

from kpnb.synth.characters import _choice

# ================================================================================================ tags, captions
_KNOWN_TAG_IDS = {"1girl": 470575, "solo": 212816}
_ARTISTS = [f"synth_artist_{k:02d}" for k in range(40)]
_CHARACTERS = ["aoi_(kpnb)", "hina_(kpnb)", "mika_(kpnb)", "rin_(kpnb)", "sora_(kpnb)", "yuki_(kpnb)"]
_EXTRA_TAGS = ["smile", "blush", "closed_mouth", "open_mouth", "bow", "ribbon", "hair_ornament", "frills",
               "collarbone", "hair_between_eyes", "jewelry", "holding"]
REVEALING_TAGS = {
    "multiple": ["multiple_girls", "2girls", "3girls"],
    "scenery": ["scenery", "no_humans"],
    "comic": ["comic", "monochrome", "greyscale"],
    "sketch": ["monochrome", "greyscale", "sketch", "lineart"],
    "border": ["letterboxed", "pillarboxed", "black_border"],
}
_WRONG_TAGS = ["monochrome", "comic", "multiple_girls", "scenery", "sketch", "letterboxed"]
_HAIR_STYLE_TAGS = {"short": ["short_hair"], "long": ["long_hair"], "twintails": ["twintails", "long_hair"],
                    "ponytail": ["ponytail"], "bangs": ["blunt_bangs", "bangs", "long_hair"]}
_POSE_TAGS = {"standing": ["standing"], "walking": ["walking"], "sitting": ["sitting"],
              "arms_up": ["arms_up", "standing"], "arms_out": ["outstretched_arms", "standing"],
              "arms_crossed": ["crossed_arms", "standing"], "waving": ["waving", "standing"],
              "kneeling": ["kneeling"], "crouching": ["squatting"], "lying": ["lying"]}
_POSE_WORDS = {"standing": "standing", "walking": "walking", "sitting": "sitting", "arms_up": "with arms up",
               "arms_out": "with arms spread out", "arms_crossed": "with arms crossed", "waving": "waving",
               "kneeling": "kneeling", "crouching": "crouching", "lying": "lying down"}
_BG_TAGS = {"plain": ["simple_background"], "gradient": ["gradient_background"],
            "stripes": ["striped_background"], "dots": ["polka_dot_background"], "floor": ["indoors"]}


def tag_id(name: str) -> str:
    """A stable made-up Danbooru tag id (the two best-known real ones kept)."""
    return str(_KNOWN_TAG_IDS.get(name, 1_000_000 + zlib.crc32(name.encode()) % 9_000_000))


def _words(name: str) -> str:
    return name.replace("_", " ")


def _character_tags(attrs: dict[str, Any], kind: str, framing: str) -> list[str]:
    t = [f"{attrs['hair_colour']}_hair"] + _HAIR_STYLE_TAGS[attrs["hair_style"]]
    c = attrs["outfit_colour"]
    if attrs["outfit"] == "dress":
        t += ["dress", f"{c}_dress"]
    else:
        t += ["skirt", f"{c}_skirt", "shirt", f"{attrs['shirt_colour']}_shirt"]
    if not attrs.get("from_behind"):
        t.append(f"{attrs['eye_colour']}_eyes")
    t.append({"none": "sleeveless", "short": "short_sleeves", "long": "long_sleeves"}[attrs["sleeves"]])
    if attrs["legwear"] != "none":
        t += ["thighhighs", f"{attrs['legwear']}_thighhighs"]
    t += _POSE_TAGS[kind] + [framing]
    if attrs.get("from_behind"):
        t.append("from_behind")
    else:
        t.append("looking_at_viewer" if attrs["facing"] == "front" else "looking_to_the_side")
    bg = attrs["background"]
    t += _BG_TAGS[bg] + ([f"{attrs['background_colour']}_background"] if bg == "plain" else [])
    if framing == "full_body" and attrs["seat"]:
        t.append("chair")
    return t


def _hair_words(attrs: dict[str, Any]) -> str:
    length = {"short": "short", "long": "long", "twintails": "long", "ponytail": "", "bangs": "long"}[attrs["hair_style"]]
    return " ".join(w for w in (length, _words(attrs["hair_colour"]), "hair") if w)


def _outfit_words(attrs: dict[str, Any]) -> str:
    if attrs["outfit"] == "dress":
        return f"a {_words(attrs['outfit_colour'])} dress"
    return f"a {_words(attrs['shirt_colour'])} shirt and a {_words(attrs['outfit_colour'])} skirt"


def _background_words(attrs: dict[str, Any]) -> str:
    c, c2 = _words(attrs["background_colour"]), _words(attrs["background_colour2"])
    return {"plain": f"plain {c} background", "gradient": f"{c} to {c2} gradient background",
            "stripes": f"{c} striped background", "dots": f"{c} polka dot background",
            "floor": f"{c} wall and {c2} floor"}[attrs["background"]]


def caption_of(attrs: dict[str, Any], kind: str, framing: str, rng: np.random.Generator) -> str:
    """One of several caption templates from the attributes, pose kind and framing."""
    style_extra = {"twintails": "twin tails", "ponytail": "a ponytail", "bangs": "blunt bangs"}.get(attrs["hair_style"])
    facing = {"front": "facing the viewer", "left": "turned to the left", "right": "turned to the right"}[attrs["facing"]]
    eyes = f"{_words(attrs['eye_colour'])} eyes, "
    if attrs.get("from_behind"):
        facing, eyes = "seen from behind", ""
    frame = {"full_body": "full body", "cowboy_shot": "cowboy shot", "upper_body": "upper body"}[framing]
    hair, outfit, pose, bg = _hair_words(attrs), _outfit_words(attrs), _POSE_WORDS[kind], _background_words(attrs)
    hair_full = hair + (f" in {style_extra}" if style_extra else "")
    templates = [
        f"a girl with {hair_full} and {outfit}, {pose}, {bg}",
        f"anime girl, {hair_full}, {eyes}{outfit}, {pose}, {facing}, {frame}, {bg}",
        f"an illustration of a girl {pose} in {outfit}; she has {hair_full}. {bg}",
        f"{frame} drawing of a girl with {hair_full} wearing {outfit}, {pose}, {facing}",
    ]
    return templates[int(rng.integers(len(templates)))]


def _meta(iid: str, general: list[str], rating: str, size: int, rng: np.random.Generator,
          meta_tags: Sequence[str] = ()) -> dict[str, Any]:
    """A Danbooru2021-shaped record (strings, like the real dump)."""
    tags = [(n, "0") for n in sorted(set(general))]
    tags.append(("original", "3"))
    tags.append((_choice(rng, _ARTISTS), "1"))
    if "1girl" in general and rng.random() < 0.25:
        tags.append((_choice(rng, _CHARACTERS), "4"))
    if rng.random() < 0.4:
        tags.append(("highres", "5"))
    for n in meta_tags:
        tags.append((n, "5"))
    return {"id": iid, "tags": [{"id": tag_id(n), "name": n, "category": c} for n, c in tags], "rating": rating,
            "image_width": str(size), "image_height": str(size), "file_ext": "png"}
