import numpy as np
import pytest

from kpnb.poses import formats as pose_formats
from kpnb.poses import pose as kp
from kpnb.run.widgets import PoseEditor


def _pose():
    rng = np.random.default_rng(0)
    return kp.Pose(rng.uniform(0.2, 0.8, (17, 2)), np.full(17, kp.VISIBLE))


def test_editor_headless_slider_preview_generate():
    calls = []

    def generate(pose):
        calls.append(pose)
        return [np.full((16, 16, 3), 200, np.uint8)] * 2

    p = _pose()
    ed = PoseEditor({"a": p, "b": kp.flip(p)}, generate)
    assert ed.pose == p
    before = ed.preview_image.copy()
    ed.x[kp.JOINT_INDEX["wrist_left"]].value = 0.95   # drag a slider
    assert ed.pose.xy[kp.JOINT_INDEX["wrist_left"], 0] == pytest.approx(0.95)
    assert not np.array_equal(before, ed.preview_image)  # the preview followed
    ed.vis[kp.JOINT_INDEX["ankle_right"]].value = kp.MISSING
    assert ed.pose.vis[kp.JOINT_INDEX["ankle_right"]] == kp.MISSING
    ed.generate_button.click()
    assert len(calls) == 1 and calls[0] == ed.pose
    assert len(ed.samples) == 2 and ed.output.value[:4] == b"\x89PNG"
    ed.preset_menu.value = "b"
    assert ed.pose == kp.flip(p)
    ed.mirror_button.click()
    assert ed.pose == p


def test_editor_outside_joint_and_error_shown():
    p = _pose()
    p.xy[16] = (0.5, 1.1)
    p = p.refresh_outside()
    ed = PoseEditor({"p": p}, lambda pose: (_ for _ in ()).throw(ValueError("bad pose: nose")))
    assert ed.pose.vis[16] == kp.OUTSIDE
    with pytest.raises(ValueError):
        ed.generate()
    assert "bad pose" in ed.status.value


def test_editor_loads_any_pose_file_and_saves_release_json_and_coco(tmp_path):
    p = _pose()
    ed = PoseEditor({"a": p})
    ed.x[kp.JOINT_INDEX["nose"]].value = 0.61  # an edit
    ed.path.value = str(tmp_path / "edited.json")
    ed.save_button.click()
    assert "saved" in ed.status.value
    again = pose_formats.read_release_json(tmp_path / "edited.json")
    assert again.xy[kp.JOINT_INDEX["nose"], 0] == pytest.approx(0.61, abs=1e-3)
    ed.path.value = str(tmp_path / "edited.coco.json")
    ed.save_button.click()
    (label, coco_pose), = pose_formats.read_pose_file(tmp_path / "edited.coco.json")[0]
    assert label.startswith("edited.coco-coco1")
    ed.preset_menu.value = "a"
    ed.load(p)
    ed.path.value = str(tmp_path / "edited.json")
    ed.load_button.click()  # back to the saved pose
    assert ed.pose.xy[kp.JOINT_INDEX["nose"], 0] == pytest.approx(0.61, abs=1e-3) and "loaded edited" in ed.status.value
    (tmp_path / "bad.json").write_text('{"hello": 1}')
    ed.path.value = str(tmp_path / "bad.json")
    ed.load_button.click()  # shown in the panel, the pose kept
    assert "not a pose file" in ed.status.value and ed.pose.xy[kp.JOINT_INDEX["nose"], 0] == pytest.approx(0.61, abs=1e-3)
    ed.path.value = str(tmp_path / "pose.txt")
    ed.save_button.click()
    assert ".coco.json" in ed.status.value
