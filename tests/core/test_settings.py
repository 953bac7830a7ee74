"""The settings checker: overrides are checked against BASE at every depth, before any work."""
import json

import pytest

from kpnb.core import settings
from kpnb.core.settings import BASE, PRESETS, ConfigError, preset_config
from kpnb.run import folder

from helpers import leaves


def _refused(overrides, *words):
    with pytest.raises(ConfigError) as e:
        preset_config("smoke", overrides)
    for w in words:
        assert w in str(e.value), str(e.value)
    return str(e.value)


# ---- a deep dotted key ---------------------------------------------------------------------------------
def test_a_deep_dotted_key_changes_only_that_value():
    cfg = preset_config("smoke", {"vq.models.f4.n_codes": 512})
    assert cfg["vq"]["models"]["f4"]["n_codes"] == 512
    want = leaves(PRESETS["smoke"])
    want["vq.models.f4.n_codes"] = 512
    assert leaves(cfg) == want
    assert PRESETS["smoke"]["vq"]["models"]["f4"]["n_codes"] == 64  # the preset is not mutated


# ---- unknown keys --------------------------------------------------------------------------------------
def test_an_unknown_key_inside_a_dict_value_is_refused_with_the_valid_ones():
    msg = _refused({"diffusion.view_repeat": {"sidee": 2}}, "'diffusion.view_repeat.sidee'")
    assert msg.endswith("valid settings of 'diffusion.view_repeat': side, back")


def test_an_unknown_deep_dotted_key_is_refused():
    _refused({"vq.models.f4.n_codez": 512}, "'vq.models.f4.n_codez'", "valid settings of 'vq.models.f4'",
             "n_codes", "latent_channels")
    _refused({"vq.models.f32.n_codes": 8}, "'vq.models.f32.n_codes'", "f4, f8, f16")
    _refused({"vq.nope": 1}, "'vq.nope'", "valid settings of 'vq'", "steps")
    _refused({"nosection.x": 1}, "'nosection.x'", "valid sections: runtime, data")


def test_a_key_below_a_plain_setting_is_refused():
    _refused({"vq.steps.x": 1}, "'vq.steps.x'", "'vq.steps' is a setting")


# ---- wrong types ---------------------------------------------------------------------------------------
def test_a_bool_where_an_int_belongs_is_refused():
    _refused({"vq.steps": True}, "'vq.steps'", "expects int")
    _refused({"diffusion.lr": False}, "'diffusion.lr'", "expects float")


def test_an_int_where_a_float_belongs_is_accepted():
    assert preset_config("smoke", {"diffusion.lr": 1})["diffusion"]["lr"] == 1
    _refused({"vq.steps": 2.5}, "'vq.steps'", "expects int")  # not the other way round


def test_a_string_where_a_float_belongs_is_refused():
    _refused({"clip.lr": "fast"}, "'clip.lr'", "expects float")


def test_a_list_where_a_dict_belongs_is_refused():
    _refused({"vq.models": [1, 2]}, "'vq.models'", "expects a dict of f4, f8, f16")


def test_a_dict_where_a_scalar_belongs_is_refused():
    _refused({"vq.steps": {"a": 1}}, "'vq.steps'", "expects int")
    _refused({"diffusion.view_repeat": {"side": {"a": 1}}}, "'diffusion.view_repeat.side'", "expects int")


def test_list_elements_take_the_type_of_base_elements():
    _refused({"diffusion.modes": ["grid", 3]}, "'diffusion.modes'", "expects list of str")
    _refused({"diffusion.modes": "grid"}, "'diffusion.modes'", "expects list of str")
    _refused({"diffusion.guidance_interval": [0, "600"]}, "'diffusion.guidance_interval'", "list of int")
    _refused({"diffusion.guidance_interval": [0, True]}, "'diffusion.guidance_interval'")
    cfg = preset_config("smoke", {"diffusion.modes": ["grid"], "diffusion.extra_specs": [],
                                  "diffusion.guidance_interval": [100, 900]})
    assert cfg["diffusion"]["modes"] == ["grid"] and cfg["diffusion"]["extra_specs"] == []
    assert cfg["diffusion"]["guidance_interval"] == [100, 900]


def test_settings_off_by_default_take_a_path_or_none():
    for key in ("clip.pretrained_path", "vq.perceptual_weights"):
        section, name = key.split(".")
        assert preset_config("smoke", {key: "/weights/file.pt"})[section][name] == "/weights/file.pt"
        assert preset_config("smoke", {key: None})[section][name] is None
        _refused({key: 3}, repr(key), "expects None or str")


def test_every_setting_defaulting_to_none_says_what_it_takes():
    # a None default shows no type: MORE_TYPES must name what such a setting accepts
    assert {k for k, v in leaves(BASE).items() if v is None} <= set(settings.MORE_TYPES)


def test_runtime_threads_take_auto_or_a_count():
    assert preset_config("smoke", {"runtime.threads": 2})["runtime"]["threads"] == 2
    assert preset_config("smoke", {"runtime.threads": "auto"})["runtime"]["threads"] == "auto"
    _refused({"runtime.threads": True}, "'runtime.threads'")


# ---- dict values merge ---------------------------------------------------------------------------------
def test_a_dict_value_merges_key_by_key():
    cfg = preset_config("smoke", {"vq.models": {"f4": {"n_codes": 512}}})
    want = leaves(PRESETS["smoke"])
    want["vq.models.f4.n_codes"] = 512
    assert leaves(cfg) == want  # f8, f16 and f4's other keys kept
    cfg = preset_config("smoke", {"diffusion.view_repeat": {"side": 5}})
    assert cfg["diffusion"]["view_repeat"] == {"side": 5, "back": PRESETS["smoke"]["diffusion"]["view_repeat"]["back"]}


def test_a_dict_value_with_an_unknown_key_is_refused():
    _refused({"vq.models": {"f4": {"n_codez": 512}}}, "'vq.models.f4.n_codez'", "n_codes")


def test_overrides_apply_in_order():
    cfg = preset_config("smoke", {"vq.models": {"f4": {"n_codes": 512, "stem": 1}}, "vq.models.f4.n_codes": 32})
    assert cfg["vq"]["models"]["f4"]["n_codes"] == 32 and cfg["vq"]["models"]["f4"]["stem"] == 1


# ---- presets --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_validates(preset):
    # each preset's values, given as overrides of every section, pass the checker and change nothing
    assert preset_config("cpu", PRESETS[preset]) == PRESETS[preset]


def test_a_preset_delta_key_base_lacks_is_refused():
    with pytest.raises(KeyError, match=r"x: vq\.models\.f4\.n_codez: no such key in BASE"):
        settings._merged(BASE, {"vq": {"models": {"f4": {"n_codez": 1}}}}, "x: ")


# ---- every way in: run folders and notebooks ----------------------------------------------------------
def test_a_notebook_refuses_bad_overrides_before_its_folder_is_made(tmp_path):
    with pytest.raises(ConfigError, match="'diffusion.view_repeat.sidee'"):
        folder.NotebookRun("01_x", "smoke", str(tmp_path / "run"), {"diffusion.view_repeat": {"sidee": 2}})
    with pytest.raises(ConfigError, match="'vq.steps' expects int"):
        folder.run_dir(tmp_path / "run", "smoke", {"vq.steps": True})
    assert not (tmp_path / "run").exists()


def test_a_run_folder_reads_its_deep_overrides_back(tmp_path):
    overrides = {"vq.models.f4.n_codes": 32, "diffusion.view_repeat": {"back": 1}}
    folder.run_dir(tmp_path, "smoke", overrides)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["overrides"] == overrides
    cfg = settings.run_config(tmp_path)
    assert cfg == saved["settings"]
    models = cfg["vq"]["models"]
    assert models["f4"]["n_codes"] == 32 and models["f8"] == PRESETS["smoke"]["vq"]["models"]["f8"]
    assert cfg["diffusion"]["view_repeat"] == {"side": 2, "back": 1}
