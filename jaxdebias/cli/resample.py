"""Antialiased bicubic resize of uint8 images, bit for bit as torch's CPU uint8 kernel computes it.

Axes: F frames (any leading axes), H x W the input, S_h x S_w the output, C channels, K taps of one output pixel.

Reproduces ``torch.nn.functional.interpolate(x_uint8, size, mode="bicubic", antialias=True, align_corners=False)``
on CPU (torch 2.x; the path torchvision's ``resize(..., BICUBIC, antialias=True)`` takes for uint8 tensors, and so
transformers' torchvision-backed video processors), itself a port of Pillow-SIMD's fixed-point resampler. Source:
pytorch/pytorch@aten/src/ATen/native/cpu/UpSampleKernel.cpp (``HelperInterpBase._compute_indices_min_size_weights_aa``,
``_compute_index_ranges_weights``, ``_compute_index_ranges_int16_weights``, ``HelperInterpCubic.aa_filter``) and
pytorch/pytorch@aten/src/ATen/native/cpu/UpSampleKernelAVXAntialias.h (``upsample_avx_bilinear_bicubic_uint8``):

- per axis, scale = in / out; the Keys cubic (a = -0.5) has support 2, stretched by the scale when downscaling
  (support = 2 * scale, the filter evaluated at distance / scale); output i covers the input pixels
  [int(c - support + 0.5), int(c + support + 0.5)) around its centre c = scale * (i + 0.5), clipped to the image,
  and its weights are normalised to sum 1 (all in float64);
- the weights become int16 with one precision per axis, the largest p < 22 for which the axis' largest weight
  times 2^(p+1) (rounded) stays below 2^15; each weight rounds half away from zero at 2^p;
- a pass is an integer weighted sum plus 2^(p-1), shifted right by p (floor) and clamped to 0..255, so it rounds
  to uint8 between the passes; the horizontal pass (width) runs first, then the vertical one, and a pass is skipped
  when its side is unchanged (nothing at all when both are).
"""

from __future__ import annotations

import numpy as np

A = -0.5  # Keys' cubic coefficient, the antialiased (Pillow-compatible) one
INTERP_SIZE = 4  # taps of the unscaled bicubic filter


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel (a = -0.5) at float64 x, evaluated in torch's operation order."""
    x = np.abs(x)
    near = ((A + 2) * x - (A + 3)) * x * x + 1
    far = ((A * x - 5 * A) * x + 8 * A) * x - 4 * A
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The resampling of one axis from ``in_size`` to ``out_size`` pixels: (index int64[out, K] of the input pixel
    under each tap (clipped into the image; taps past an output's window carry weight 0), weight int64[out, K] in
    fixed point, precision p: output = (sum weight * pixel + 2^(p-1)) >> p)."""
    scale = in_size / out_size
    support = INTERP_SIZE * 0.5 * scale if scale >= 1.0 else INTERP_SIZE * 0.5
    k = int(np.ceil(support)) * 2 + 1
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    center = scale * (np.arange(out_size, dtype=np.float64) + 0.5)
    # C casts to int64 truncate toward zero, as np.trunc does
    xmin = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
    xsize = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
    xsize = np.clip(xsize, 0, k)
    j = np.arange(k, dtype=np.int64)
    inside = j[None, :] < xsize[:, None]
    w = np.where(inside, _cubic(((j[None, :] + xmin[:, None]).astype(np.float64) - center[:, None] + 0.5)
                                * invscale), 0.0)
    total = np.zeros(out_size)
    for t in range(k):  # summed in tap order, as the C loop does
        total = total + w[:, t]
    w = np.where(total[:, None] != 0.0, w / np.where(total == 0.0, 1.0, total)[:, None], w)
    w_max = float(np.max(np.where(inside & (total[:, None] != 0.0), w, 0.0), initial=0.0))
    precision = 0
    while precision < 22 and int(0.5 + w_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    v = np.where(inside, w, 0.0) * (1 << precision)
    weights = np.trunc(np.where(v < 0, v - 0.5, v + 0.5)).astype(np.int16).astype(np.int64)
    index = np.minimum(xmin[:, None] + j[None, :], in_size - 1)
    return index, weights, precision


def _pass(x: np.ndarray, axis: int, out_size: int) -> np.ndarray:
    """One separable pass of uint8 ``x`` along ``axis`` (negative) to ``out_size`` pixels, rounded to uint8."""
    index, weights, precision = taps(x.shape[axis], out_size)
    # the sum stays in int32 when its bound does (255 * sum |w| + the rounding half): always at sane sizes
    bound = 255 * int(np.abs(weights).sum(axis=1).max(initial=0)) + (1 << precision)
    dtype = np.int32 if bound < 2**31 else np.int64
    shape = [1] * x.ndim
    shape[axis] = out_size
    acc = np.full(x.shape[:axis % x.ndim] + (out_size,) + x.shape[axis % x.ndim + 1:], 1 << (precision - 1)
                  if precision else 0, dtype)
    for t in range(index.shape[1]):
        if not weights[:, t].any():
            continue
        acc += np.take(x, index[:, t], axis=axis).astype(dtype) * weights[:, t].astype(dtype).reshape(shape)
    return np.clip(acc >> precision, 0, 255).astype(np.uint8)


def resize_bicubic_aa(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8[..., H, W, C] -> uint8[..., S_h, S_w, C]: antialiased bicubic resize to ``size`` = (S_h, S_w), equal
    to torch's CPU ``interpolate(..., mode="bicubic", antialias=True)`` on the same uint8 images (channels first
    there). The leading axes (frames, batch) are independent images."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim < 3:
        raise ValueError(f"Expected uint8 images [..., H, W, C]; got {images.dtype} of shape {images.shape}. "
                         "Convert the frames to RGB uint8 arrays first (np.asarray(pil_image.convert('RGB'))).")
    out_h, out_w = (int(s) for s in size)
    if out_h < 1 or out_w < 1 or images.shape[-3] < 1 or images.shape[-2] < 1:
        raise ValueError(f"Cannot resize images of shape {images.shape} to {size}: every side must be >= 1.")
    out = images
    if out_w != images.shape[-2]:
        out = _pass(out, -2, out_w)  # horizontal first, as torch does
    if out_h != images.shape[-3]:
        out = _pass(out, -3, out_h)
    return out if out is not images else images.copy()
