import numpy as np
from PIL import Image

import jaxdebias as jd
from jaxdebias.toy import default_scene, scenes


def test_the_rule_takes_the_first_letterboxed_scene_with_the_trend():
    b = 4e-4
    assert default_scene.choose([-2e-3, 9e-4, 5e-4, 3e-4, 6e-4], [240, 0, 144, 96, 96], b) == 2  # 1: no padding
    assert default_scene.choose([1e-4, 3.9e-4], [96, 96], b) is None
    assert default_scene.choose([], [], b) is None


def test_a_curve_lowers_the_fitted_slope_by_its_b():
    # why the rule asks for slope >= b: dividing by exp(b i) moves the log-linear slope by exactly -b, so it
    # flattens a slope s iff 0 < b < 2 s
    i = np.arange(576)
    content = (i >= 72) & (i < 504)
    rng = np.random.default_rng(0)
    scores = np.exp(6e-4 * i + rng.normal(0, 0.5, 576)).astype(np.float32)
    b = 3.9e-4
    before = float(jd.bias_strength(scores, content=content)["slope"])
    after = float(jd.bias_strength(scores * np.exp(-b * i).astype(np.float32), content=content)["slope"])
    np.testing.assert_allclose(after, before - b, atol=1e-6)


def test_the_shipped_image_is_the_picked_scene():
    shipped = np.asarray(Image.open(default_scene.path()).convert("RGB"))
    s = scenes.scene(scenes.stream(default_scene.SEED, default_scene.SPLIT, default_scene.SHIPPED))
    np.testing.assert_array_equal(shipped, np.asarray(scenes.render(s)))
    padding = ~np.asarray(jd.pad_mask_expand2square(s.width, s.height, grid=24, tau=default_scene.TAU))
    assert s.width != s.height and padding.sum() == 144 and len(s.objects) == 3
