"""The pose editor: an ipywidgets panel to edit a pose joint by joint and generate images for it.

Each of the 17 joints gets x and y sliders and a visibility toggle; presets (example poses, held-out poses)
load a pose, a mirror button flips it (with the left/right swap), a live preview draws the skeleton, and
*Generate* calls ``generate(pose) -> list of uint8 images`` and shows the result. A path box loads a pose file
(release JSON, COCO or OpenPose: the first usable person) and saves the edited pose as release JSON, or as a
COCO annotation when the path ends in ``.coco.json``.

Everything goes through :class:`PoseEditor`'s methods and widget values, so tests drive it headless exactly
as a person does in JupyterLab: set a slider's ``value``, press ``generate_button.click()``.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from kpnb.core.files import atomic_write_bytes
from kpnb.poses.formats import pose_to_coco, read_pose_file, write_release_json
from kpnb.poses.pose import HIDDEN, JOINTS, MISSING, OUTSIDE, VISIBLE, Pose, PoseError, draw_skeleton, flip

VIS_OPTIONS = [("visible", VISIBLE), ("hidden", HIDDEN), ("missing", MISSING)]


def _png(img: np.ndarray) -> bytes:

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


class PoseEditor:
    """``PoseEditor(presets, generate, preview_size=192)``; show it with ``display(editor.widget)``."""

    def __init__(self, presets: Mapping[str, Pose], generate: Callable[[Pose], Sequence[np.ndarray]] | None = None,
                 preview_size: int = 192, sample_size: int = 128):
        import ipywidgets as w

        if not presets:
            raise ValueError("PoseEditor needs at least one preset pose")
        self.presets = dict(presets)
        self.generate_fn = generate
        self.preview_size = preview_size
        self.sample_size = sample_size
        self.samples: list[np.ndarray] = []
        self._updating = False
        first = next(iter(self.presets.values()))

        self.x = [w.FloatSlider(min=-0.25, max=1.25, step=0.005, description="x", readout_format=".3f",
                                continuous_update=True, layout=w.Layout(width="220px")) for _ in JOINTS]
        self.y = [w.FloatSlider(min=-0.25, max=1.25, step=0.005, description="y", readout_format=".3f",
                                continuous_update=True, layout=w.Layout(width="220px")) for _ in JOINTS]
        self.vis = [w.Dropdown(options=VIS_OPTIONS, value=VISIBLE, layout=w.Layout(width="100px")) for _ in JOINTS]
        for s in self.x + self.y + self.vis:
            s.observe(self._on_change, names="value")
        self.preset_menu = w.Dropdown(options=list(self.presets), description="preset")
        self.preset_menu.observe(lambda ch: self.load(self.presets[ch["new"]]), names="value")
        self.mirror_button = w.Button(description="mirror", icon="arrows-h")
        self.mirror_button.on_click(lambda _: self.load(flip(self.pose)))
        self.generate_button = w.Button(description="Generate", button_style="primary", icon="magic")
        self.generate_button.on_click(lambda _: self.generate())
        self.status = w.HTML()
        self.path = w.Text(placeholder="pose file: .json (release, COCO, OpenPose); save: .json or .coco.json",
                           layout=w.Layout(width="360px"))
        self.load_button = w.Button(description="load file", icon="folder-open")
        self.load_button.on_click(lambda _: self.load_file(self.path.value))
        self.save_button = w.Button(description="save pose", icon="save")
        self.save_button.on_click(lambda _: self.save_file(self.path.value))
        self.preview = w.Image(format="png", width=preview_size, height=preview_size)
        self.output = w.Image(format="png")
        rows = [w.HBox([w.Label(name, layout=w.Layout(width="110px")), self.x[j], self.y[j], self.vis[j]])
                for j, name in enumerate(JOINTS)]
        left = w.VBox(rows, layout=w.Layout(max_height="420px", overflow="auto"))
        right = w.VBox([w.HBox([self.preset_menu, self.mirror_button, self.generate_button]),
                        w.HBox([self.path, self.load_button, self.save_button]), self.preview, self.status,
                        self.output])
        self.widget = w.HBox([left, right])
        self.load(first)

    # ---- state ----------------------------------------------------------------------------------------
    @property
    def pose(self) -> Pose:
        xy = np.array([[self.x[j].value, self.y[j].value] for j in range(len(JOINTS))], np.float32)
        vis = np.array([self.vis[j].value for j in range(len(JOINTS))], np.int8)
        xy[vis == MISSING] = 0.0
        return Pose(xy, vis).refresh_outside()

    def load(self, pose: Pose) -> None:
        """Set every slider from ``pose`` (outside-the-frame joints keep their coordinates, shown visible)."""
        self._updating = True
        try:
            for j in range(len(JOINTS)):
                self.x[j].value = float(np.clip(pose.xy[j, 0], -0.25, 1.25))
                self.y[j].value = float(np.clip(pose.xy[j, 1], -0.25, 1.25))
                v = int(pose.vis[j])
                self.vis[j].value = VISIBLE if v == OUTSIDE else v
        finally:
            self._updating = False
        self._on_change()

    def set_joint(self, name: str, x: float | None = None, y: float | None = None, vis: int | None = None) -> None:
        j = JOINTS.index(name)
        if x is not None:
            self.x[j].value = x
        if y is not None:
            self.y[j].value = y
        if vis is not None:
            self.vis[j].value = vis

    def _on_change(self, *_: object) -> None:
        if self._updating:
            return
        self.preview_image = draw_skeleton(self.pose, self.preview_size)
        self.preview.value = _png(self.preview_image)

    # ---- files ----------------------------------------------------------------------------------------
    def load_file(self, path: str) -> Pose | None:
        """Load the first usable pose of a pose file; a bad file is shown in the panel, not raised."""
        try:
            poses, _ = read_pose_file(path.strip())
            if not poses:
                raise PoseError("no person with enough labelled joints", source=path)
        except (PoseError, OSError) as e:
            self.status.value = f"<span style='color:#b00'>{e}</span>"
            return None
        label, pose = poses[0]
        self.load(pose)
        self.status.value = f"loaded {label}"
        return pose

    def save_file(self, path: str) -> Path | None:
        """Save the edited pose: a COCO annotation (512 x 512 image) for ``*.coco.json``, else release JSON."""
        import json
        from pathlib import Path

        out = Path(path.strip())
        if not out.name.endswith(".json"):
            self.status.value = "<span style='color:#b00'>give a .json (release) or .coco.json (COCO) path</span>"
            return None
        try:
            if out.name.endswith(".coco.json"):
                atomic_write_bytes(out, json.dumps({"images": [{"id": 1, "width": 512, "height": 512}], "annotations": [
                    {"image_id": 1, "keypoints": pose_to_coco(self.pose, 512, 512)}]}).encode())
            else:
                write_release_json(self.pose, out)
        except OSError as e:
            self.status.value = f"<span style='color:#b00'>cannot write {out}: {e}</span>"
            return None
        self.status.value = f"saved {out}"
        return out

    # ---- generate -------------------------------------------------------------------------------------
    def generate(self) -> list[np.ndarray]:
        if self.generate_fn is None:
            self.status.value = "<b>no generator attached</b>"
            return []
        self.status.value = "generating ..."
        try:
            images = list(self.generate_fn(self.pose))
        except Exception as e:  # noqa: BLE001 - shown in the panel, not lost in a callback
            self.status.value = f"<span style='color:#b00'>error: {type(e).__name__}: {e}</span>"
            raise
        self.samples = images
        if images:

            tiles = [np.asarray(Image.fromarray(im).resize((self.sample_size, self.sample_size), Image.NEAREST))
                     for im in images]
            self.output.value = _png(np.concatenate(tiles, axis=1))
        self.status.value = f"{len(images)} sample(s)"
        return images
