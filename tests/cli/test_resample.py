"""``resample.resize_bicubic_aa`` equals torch's CPU uint8 antialiased bicubic kernel bit for bit (the resize of
transformers' torchvision-backed video processors): downscales, upscales, one side unchanged, non-square, 1 to 4
channels, both memory layouts torch takes (channels first, as the video processor passes frames, and channels last),
and random small shapes."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxdebias.cli.resample import resize_bicubic_aa, taps

torch = pytest.importorskip("torch")


def torch_resize(x, size, channels_last=False):
    """uint8[F, H, W, C] -> uint8[F, S_h, S_w, C] through torch.nn.functional.interpolate on CPU."""
    t = torch.from_numpy(x).permute(0, 3, 1, 2)  # a channels-last view of the frames
    if not channels_last:
        t = t.contiguous()  # channels first, as torchvision gets the video processor's [F, 3, H, W] frames
    out = torch.nn.functional.interpolate(t, size=list(size), mode="bicubic", antialias=True, align_corners=False)
    return out.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("shape, size", [
    ((480, 640), (384, 384)),  # a video frame to the SigLIP side: both sides shrink, by different factors
    ((30, 40), (32, 32)),  # height up, width down
    ((20, 30), (32, 32)),  # both up
    ((100, 100), (384, 384)),  # a large upscale
    ((32, 50), (32, 20)),  # height unchanged: the vertical pass is skipped
    ((50, 32), (17, 32)),  # width unchanged: the horizontal pass is skipped
    ((64, 48), (31, 70)),  # non-square output
    ((1000, 13), (3, 600)),  # a 333x downscale (wide filter, low weight precision) next to a 46x upscale
    ((1, 5), (3, 1)),  # single-pixel sides
    ((33, 33), (33, 33)),  # unchanged: a copy
])
def test_equals_torch(shape, size):
    rng = np.random.default_rng(sum(shape) + sum(size))
    x = rng.integers(0, 256, (2, *shape, 3), dtype=np.uint8)
    ours = resize_bicubic_aa(x, size)
    assert ours.dtype == np.uint8 and ours.shape == (2, *size, 3)
    np.testing.assert_array_equal(ours, torch_resize(x, size))
    np.testing.assert_array_equal(ours, torch_resize(x, size, channels_last=True))


def test_extremes_clamp_like_torch():
    # a checkerboard of 0 and 255 drives the cubic's negative lobes past both ends of 0..255
    x = (np.indices((2, 24, 24)).sum(0) % 2 * 255).astype(np.uint8)[..., None].repeat(3, -1)
    for size in [(37, 37), (10, 10), (24, 50)]:
        np.testing.assert_array_equal(resize_bicubic_aa(x, size), torch_resize(x, size))


def test_one_image_and_weights():
    x = np.random.default_rng(0).integers(0, 256, (9, 14, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_bicubic_aa(x, (5, 20)), torch_resize(x[None], (5, 20))[0])
    index, weights, precision = taps(640, 384)
    assert index.shape == weights.shape == (384, 9) and 0 < precision < 22
    assert np.all(np.abs(weights.sum(1) - (1 << precision)) <= 9)  # normalised weights, rounded one by one


def test_refuses_what_it_cannot_resize():
    with pytest.raises(ValueError, match="uint8"):
        resize_bicubic_aa(np.zeros((4, 4, 3), np.float32), (2, 2))
    with pytest.raises(ValueError, match=">= 1"):
        resize_bicubic_aa(np.zeros((4, 4, 3), np.uint8), (0, 2))


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 40), w=st.integers(1, 40), sh=st.integers(1, 40), sw=st.integers(1, 40),
       c=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_random_shapes_equal_torch(h, w, sh, sw, c, seed):
    x = np.random.default_rng(seed).integers(0, 256, (1, h, w, c), dtype=np.uint8)
    np.testing.assert_array_equal(resize_bicubic_aa(x, (sh, sw)), torch_resize(x, (sh, sw)))
