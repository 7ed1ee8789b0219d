"""ImageNet-C corruptions (diffaug_fast.data.corruptions) and their CLI (diffaug_fast.corrupt).

The reference is Hendrycks & Dietterich's scripts (hendrycks/robustness, ImageNet-C/create_c/make_cifar_c.py
and make_imagenet_c.py): their severity constants are transcribed below as test data, and each corruption
is checked against its closed form, computed here independently (explicit kernels, shifted sums, colorsys)
from the same generator stream.
"""

from __future__ import annotations

import colorsys
import io
import json
import os

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from scipy.sparse import lil_matrix
from scipy.sparse.csgraph import dijkstra

from diffaug_fast import corrupt as cli
from diffaug_fast.data import corruptions as C

# ------------------------------------------------------------------------------------ reference constants
# Transcribed from make_cifar_c.py and make_imagenet_c.py, written as they write them.
REF_CIFAR = {
    "gaussian_noise": [0.04, 0.06, .08, .09, .10],
    "shot_noise": [500, 250, 100, 75, 50],
    "impulse_noise": [.01, .02, .03, .05, .07],
    "speckle_noise": [.06, .1, .12, .16, .2],
    "gaussian_blur": [.4, .6, 0.7, .8, 1],
    "glass_blur": [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)],
    "defocus_blur": [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],
    "motion_blur": [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)],
    "zoom_blur": [np.arange(1, 1.06, 0.01), np.arange(1, 1.11, 0.01), np.arange(1, 1.16, 0.01),
                  np.arange(1, 1.21, 0.01), np.arange(1, 1.26, 0.01)],
    "fog": [(.2, 3), (.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)],
    "frost": [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)],
    "snow": [(0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
             (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)],
    "spatter": [(0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.1, 0.8, 0.7, 0.5, 0), (0.65, 0.3, 1, 0.69, 0.5, 0),
                (0.65, 0.1, 0.7, 0.69, 0.6, 1), (0.65, 0.1, 0.5, 0.68, 0.6, 1)],
    "contrast": [.75, .5, .4, .3, 0.15],
    "brightness": [.05, .1, .15, .2, .3],
    "saturate": [(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)],
    "jpeg_compression": [80, 65, 58, 50, 40],
    "pixelate": [0.95, 0.9, 0.85, 0.75, 0.65],
    "elastic_transform": [(32 * 0, 32 * 0, 32 * 0.08), (32 * 0.05, 32 * 0.2, 32 * 0.07), (32 * 0.08, 32 * 0.06, 32 * 0.06),
                          (32 * 0.1, 32 * 0.04, 32 * 0.05), (32 * 0.1, 32 * 0.03, 32 * 0.03)],
}
REF_IMAGENET = {
    "gaussian_noise": [.08, .12, 0.18, 0.26, 0.38],
    "shot_noise": [60, 25, 12, 5, 3],
    "impulse_noise": [.03, .06, .09, 0.17, 0.27],
    "speckle_noise": [.15, .2, 0.35, 0.45, 0.6],
    "gaussian_blur": [1, 2, 3, 4, 6],
    "glass_blur": [(0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)],
    "defocus_blur": [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)],
    "motion_blur": [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)],
    "zoom_blur": [np.arange(1, 1.11, 0.01), np.arange(1, 1.16, 0.01), np.arange(1, 1.21, 0.02),
                  np.arange(1, 1.26, 0.02), np.arange(1, 1.31, 0.03)],
    "fog": [(1.5, 2), (2, 2), (2.5, 1.7), (2.5, 1.5), (3, 1.4)],
    "frost": [(1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)],
    "snow": [(0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7), (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
             (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65), (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55)],
    "spatter": [(0.65, 0.3, 4, 0.69, 0.6, 0), (0.65, 0.3, 3, 0.68, 0.6, 0), (0.65, 0.3, 2, 0.68, 0.5, 0),
                (0.65, 0.3, 1, 0.65, 1.5, 1), (0.67, 0.4, 1, 0.65, 1.5, 1)],
    "contrast": [0.4, .3, .2, .1, .05],
    "brightness": [.1, .2, .3, .4, .5],
    "saturate": [(0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)],
    "jpeg_compression": [25, 18, 15, 10, 7],
    "pixelate": [0.6, 0.5, 0.4, 0.3, 0.25],
    "elastic_transform": [(244 * 2, 244 * 0.7, 244 * 0.1), (244 * 2, 244 * 0.08, 244 * 0.2),
                          (244 * 0.05, 244 * 0.01, 244 * 0.02), (244 * 0.07, 244 * 0.01, 244 * 0.02),
                          (244 * 0.12, 244 * 0.01, 244 * 0.02)],
}
REFERENCE = {"cifar": REF_CIFAR, "imagenet": REF_IMAGENET}
ORDER = ["gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
         "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression"]
RANDOM = ["gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "glass_blur", "motion_blur", "snow",
          "frost", "fog", "elastic_transform", "spatter"]


def photo(h: int, w: int | None = None, seed: int = 0) -> np.ndarray:
    """A photo-like uint8 (h, w, 3) image: sky-like gradients, coloured discs with hard edges, a striped
    patch (fine texture) and faint sensor noise."""
    w = w or h
    r = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    img = np.stack([0.3 + 0.5 * yy, 0.4 + 0.3 * xx, 0.8 - 0.5 * yy], -1)
    for _ in range(6):
        cy, cx, rad = r.uniform(0, 1, 3)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < (0.1 + 0.2 * rad) ** 2] = r.uniform(0, 1, 3)
    img += (0.08 * np.sin(40 * xx) * (xx > 0.5))[..., None]
    img += r.normal(0, 0.02, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def to_u8(y: np.ndarray) -> np.ndarray:
    return np.clip(y, 0, 255).astype(np.uint8)


def assert_close(out: np.ndarray, ref: np.ndarray, max_level: int = 1, max_frac: float = 0.01) -> None:
    """Equal up to float-order flips of the uint8 truncation: at most ``max_level`` apart, on at most
    ``max_frac`` of the values."""
    assert out.shape == ref.shape and out.dtype == np.uint8
    d = np.abs(out.astype(int) - ref.astype(int))
    assert d.max() <= max_level and (d > 0).mean() <= max_frac, (d.max(), (d > 0).mean())


# --------------------------------------------------------------------------- independent reference ops


def correlate_shifts(img: np.ndarray, kernel: np.ndarray, mode: str) -> np.ndarray:
    """sum_{a,b} kernel[a, b] * img[y + a - ra, x + b - rb] (ra, rb: the kernel's half sizes), borders by
    np.pad ``mode``; img (H, W[, C])."""
    ra, rb = kernel.shape[0] // 2, kernel.shape[1] // 2
    p = np.pad(img.astype(np.float64), [(ra, ra), (rb, rb)] + [(0, 0)] * (img.ndim - 2), mode=mode)
    h, w = img.shape[:2]
    out = np.zeros(img.shape)
    for a in range(kernel.shape[0]):
        for b in range(kernel.shape[1]):
            if kernel[a, b] != 0:
                out += kernel[a, b] * p[a : a + h, b : b + w]
    return out


def gauss_ref(img: np.ndarray, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """skimage.filters.gaussian: separable kernel exp(-x^2 / 2 sigma^2), radius int(truncate sigma + 0.5),
    borders repeated ('nearest')."""
    r = int(truncate * sigma + 0.5)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    return correlate_shifts(correlate_shifts(img, k[:, None], "edge"), k[None, :], "edge") if r else img * 1.0


def motion_ref(img: np.ndarray, radius: float, sigma: float, angle: float) -> np.ndarray:
    """ImageMagick MotionBlurImage as a 2-D kernel: taps i = 0..2 ceil(radius) at (ceil(i sin a - 0.5),
    ceil(i cos a - 0.5)), weights exp(-i^2 / 2 sigma^2) normalized, edge pixels repeated, rounded."""
    width = 2 * int(np.ceil(radius)) + 1
    k = np.zeros((2 * width - 1, 2 * width - 1))
    wts = np.exp(-np.arange(width) ** 2 / (2 * sigma**2))
    for i in range(width):
        dx = int(np.ceil(i * np.cos(np.deg2rad(angle)) - 0.5))
        dy = int(np.ceil(i * np.sin(np.deg2rad(angle)) - 0.5))
        k[width - 1 + dy, width - 1 + dx] += wts[i] / wts.sum()
    return np.rint(np.clip(ndimage.correlate(img.astype(np.float64), k[..., None], mode="nearest"), 0, 255))


def zoom_ref(img: np.ndarray, z: float) -> np.ndarray:
    h, w = img.shape[:2]
    ch, cw = int(np.ceil(h / z)), int(np.ceil(w / z))
    t, left = (h - ch) // 2, (w - cw) // 2
    out = ndimage.zoom(img[t : t + ch, left : left + cw], (z, z, 1), order=1)
    a, b = (out.shape[0] - h) // 2, (out.shape[1] - w) // 2
    return out[a : a + h, b : b + w]


def plasma_ref(n: int, decay: float, g: np.random.Generator) -> np.ndarray:
    """Diamond-square, one point at a time: each new point = mean of its 4 (wrapped) neighbours at the
    level's half step + wibble * U(-wibble, wibble); noise drawn per set (square centres, then the
    diamond points on corner rows, then on corner columns), row-major."""
    a = np.zeros((n, n))
    step, wib = n, 100.0
    while step >= 2:
        half, m = step // 2, n // step
        noise = g.uniform(-wib, wib, (m, m))
        for i in range(m):
            for j in range(m):
                y, x = i * step, j * step
                s = a[y, x] + a[(y + step) % n, x] + a[y, (x + step) % n] + a[(y + step) % n, (x + step) % n]
                a[y + half, x + half] = s / 4 + wib * noise[i, j]
        for rows_first in (True, False):
            noise = g.uniform(-wib, wib, (m, m))
            for i in range(m):
                for j in range(m):
                    y, x = (i * step, j * step + half) if rows_first else (i * step + half, j * step)
                    s = (a[(y - half) % n, x] + a[(y + half) % n, x] + a[y, (x - half) % n] + a[y, (x + half) % n])
                    a[y, x] = s / 4 + wib * noise[i, j]
        step, wib = half, wib / decay
    a -= a.min()
    return a / a.max()


def hsv_map(x: np.ndarray, fn) -> np.ndarray:
    """Apply fn(h, s, v) -> (h, s, v) per pixel through colorsys; x uint8 (H, W, 3) -> float 0..255."""
    flat = x.reshape(-1, 3) / 255.0
    out = np.array([colorsys.hsv_to_rgb(*fn(*colorsys.rgb_to_hsv(*p))) for p in flat])
    return np.clip(out, 0, 1).reshape(x.shape) * 255


def cv_gauss_blur_ref(img: np.ndarray, ksize: int, sigma: float) -> np.ndarray:
    k = np.exp(-((np.arange(ksize) - (ksize - 1) / 2) ** 2) / (2 * sigma**2))
    k /= k.sum()
    return correlate_shifts(img, np.outer(k, k), "reflect")  # np 'reflect' = OpenCV's default REFLECT_101


def disk_ref(radius: float, alias_blur: float) -> np.ndarray:
    half, ks = (8, 3) if radius <= 8 else (int(radius), 5)
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    d = (xx**2 + yy**2 <= radius**2).astype(np.float32)  # float32, as the reference's disk and OpenCV's blur
    return cv_gauss_blur_ref(d / d.sum(), ks, alias_blur).astype(np.float32)


# ------------------------------------------------------------------------------------------ the API


def test_names_order_and_families():
    assert list(C.CORRUPTIONS) == ORDER
    assert C.VALIDATION_CORRUPTIONS == ("speckle_noise", "gaussian_blur", "spatter", "saturate")
    assert C.FAMILIES == {"noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
                          "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
                          "weather": ("snow", "frost", "fog", "brightness"),
                          "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression")}
    assert sum(C.FAMILIES.values(), ()) == C.CORRUPTIONS


@pytest.mark.parametrize("table", ["cifar", "imagenet"])
def test_severity_constants_match_reference_scripts(table):
    ours, ref = C.SEVERITY_CONSTANTS[table], REFERENCE[table]
    assert set(ours) == set(ref) == set(C.ALL_CORRUPTIONS)
    for name in ref:
        for sev in range(1, 6):
            got = ours[name][sev - 1]
            if name == "zoom_blur":
                got = np.arange(*got)  # stored as np.arange arguments
            np.testing.assert_allclose(np.asarray(got, float), np.asarray(ref[name][sev - 1], float), rtol=0,
                                       atol=1e-12, err_msg=f"{table} {name} severity {sev}")
            assert C.severity_constants(name, sev, table) == ours[name][sev - 1]


def test_constants_rule():
    assert C.resolve_constants(32, 32) == "cifar"
    assert C.resolve_constants(64, 64) == "cifar"
    assert C.resolve_constants(64, 500) == "cifar"  # the shorter side decides
    assert C.resolve_constants(65, 65) == "imagenet"
    assert C.resolve_constants(224, 224) == "imagenet"
    assert C.resolve_constants(32, 32, "imagenet") == "imagenet"
    with pytest.raises(ValueError, match="constants"):
        C.resolve_constants(32, 32, "tiny")


# ------------------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("table", ["cifar", "imagenet"])
def test_noise_closed_forms(table):
    x = photo(32)
    ref = REFERENCE[table]
    for s in range(1, 6):
        c = ref["gaussian_noise"][s - 1]
        want = np.clip(x / 255.0 + rng(s).normal(size=x.shape, scale=c), 0, 1) * 255
        np.testing.assert_array_equal(C.corrupt(x, "gaussian_noise", s, rng(s), table), to_u8(want))
        c = ref["shot_noise"][s - 1]
        want = np.clip(rng(s).poisson(x / 255.0 * c) / c, 0, 1) * 255
        np.testing.assert_array_equal(C.corrupt(x, "shot_noise", s, rng(s), table), to_u8(want))
        c = ref["speckle_noise"][s - 1]
        y = x / 255.0
        want = np.clip(y + y * rng(s).normal(size=x.shape, scale=c), 0, 1) * 255
        np.testing.assert_array_equal(C.corrupt(x, "speckle_noise", s, rng(s), table), to_u8(want))
        c = ref["impulse_noise"][s - 1]
        g = rng(s)
        flip, salt = g.random(x.shape) <= c, g.random(x.shape) <= 0.5
        want = np.where(flip, np.where(salt, 255, 0), x)
        out = C.corrupt(x, "impulse_noise", s, rng(s), table)
        assert_close(out, want.astype(np.uint8))
        assert abs((out != x).mean() - c * 0.99) < 0.02  # ~c of the values replaced (few already 0 or 255)


@pytest.mark.parametrize("table", ["cifar", "imagenet"])
def test_photometric_closed_forms(table):
    x = photo(16, 20, seed=3)
    ref = REFERENCE[table]
    for s in range(1, 6):
        c = ref["contrast"][s - 1]
        y = x / 255.0
        m = y.mean(axis=(0, 1))
        np.testing.assert_array_equal(C.corrupt(x, "contrast", s, rng(), table), to_u8(np.clip((y - m) * c + m, 0, 1) * 255))
        c = ref["brightness"][s - 1]
        want = hsv_map(x, lambda h, sat, v, c=c: (h, sat, min(v + c, 1.0)))
        assert_close(C.corrupt(x, "brightness", s, rng(), table), to_u8(want))
        a, b = ref["saturate"][s - 1]
        want = hsv_map(x, lambda h, sat, v, a=a, b=b: (h, min(max(sat * a + b, 0.0), 1.0), v))
        assert_close(C.corrupt(x, "saturate", s, rng(), table), to_u8(want))


@pytest.mark.parametrize("table", ["cifar", "imagenet"])
def test_digital_closed_forms(table):
    x = photo(40, 36, seed=4)
    h, w = x.shape[:2]
    for s in range(1, 6):
        c = REFERENCE[table]["pixelate"][s - 1]
        small = Image.fromarray(x).resize((int(w * c), int(h * c)), Image.Resampling.BOX)
        np.testing.assert_array_equal(C.corrupt(x, "pixelate", s, rng(), table),
                                      np.asarray(small.resize((w, h), Image.Resampling.BOX)))
        buf = io.BytesIO()
        Image.fromarray(x).save(buf, "JPEG", quality=REFERENCE[table]["jpeg_compression"][s - 1])
        want = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        np.testing.assert_array_equal(C.corrupt(x, "jpeg_compression", s, rng(), table), want)
        assert C.jpeg_compression_bytes(x, s, table) == buf.getvalue()


@pytest.mark.parametrize("table", ["cifar", "imagenet"])
def test_blur_closed_forms(table):
    x = photo(32, seed=5)
    ref = REFERENCE[table]
    for s in range(1, 6):
        c = ref["gaussian_blur"][s - 1]
        want = np.clip(gauss_ref(x / 255.0, c), 0, 1) * 255
        assert_close(C.corrupt(x, "gaussian_blur", s, rng(), table), to_u8(want))
        radius, alias = ref["defocus_blur"][s - 1]
        want = np.clip(correlate_shifts(x / 255.0, disk_ref(radius, alias), "reflect"), 0, 1) * 255
        assert_close(C.corrupt(x, "defocus_blur", s, rng(), table), to_u8(want))
        zooms = ref["zoom_blur"][s - 1]
        y = (x / 255.0).astype(np.float32)
        want = (y + sum(zoom_ref(y, z) for z in zooms)) / (len(zooms) + 1)
        assert_close(C.corrupt(x, "zoom_blur", s, rng(), table), to_u8(np.clip(want, 0, 1) * 255))
        radius, sigma = ref["motion_blur"][s - 1]
        want = motion_ref(x, radius, sigma, rng(s).uniform(-45, 45))
        np.testing.assert_array_equal(C.corrupt(x, "motion_blur", s, rng(s), table), to_u8(want))


@pytest.mark.parametrize("table", ["cifar", "imagenet"])
def test_glass_blur_is_the_reference_loop(table):
    """The reference's loop verbatim in spirit: blur, then per visited pixel the tuple "swap" on numpy views
    (which copies the neighbour in), then blur again."""
    x = photo(32, seed=6)
    for s in range(1, 6):
        sigma, d, iters = REFERENCE[table]["glass_blur"][s - 1]
        g = rng(s)
        y = np.uint8(gauss_ref(x / 255.0, sigma) * 255)
        for _ in range(iters):
            visits = [(hh, ww) for hh in range(32 - d, d, -1) for ww in range(32 - d, d, -1)]
            offs = g.integers(-d, d, size=(len(visits), 2))
            for (hh, ww), (dx, dy) in zip(visits, offs):
                y[hh, ww], y[hh + dy, ww + dx] = y[hh + dy, ww + dx], y[hh, ww]
        want = np.clip(gauss_ref(y / 255.0, sigma), 0, 1) * 255
        assert_close(C.corrupt(x, "glass_blur", s, rng(s), table), to_u8(want))


@pytest.mark.parametrize("table", ["cifar", "imagenet"])
def test_fog_closed_form(table):
    x = photo(32, seed=7)
    for s in range(1, 6):
        strength, decay = REFERENCE[table]["fog"][s - 1]
        p = plasma_ref(32, decay, rng(s))
        y = x / 255.0
        want = np.clip((y + strength * p[..., None]) * y.max() / (y.max() + strength), 0, 1) * 255
        assert_close(C.corrupt(x, "fog", s, rng(s), table), to_u8(want))
    p = C.plasma_fractal(64, 2.0, rng(1))
    assert p.shape == (64, 64) and p.min() == 0 and p.max() == 1
    np.testing.assert_allclose(p, plasma_ref(64, 2.0, rng(1)), atol=1e-12)


@pytest.mark.parametrize("table", ["cifar", "imagenet"])
def test_snow_closed_form(table):
    x = photo(32, seed=8)
    for s in range(1, 6):
        c = REFERENCE[table]["snow"][s - 1]
        g = rng(s)
        layer = zoom_ref(g.normal(c[0], c[1], (32, 32))[..., None], c[2])
        layer[layer < c[3]] = 0
        layer = motion_ref((np.clip(layer, 0, 1) * 255).astype(np.uint8), c[4], c[5], g.uniform(-135, -45)) / 255
        y = x.astype(np.float32) / 255
        grey = (y @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
        y = c[6] * y + (1 - c[6]) * np.maximum(y, grey * 1.5 + 0.5)
        want = np.clip(y + layer + layer[::-1, ::-1], 0, 1) * 255
        assert_close(C.corrupt(x, "snow", s, rng(s), table), to_u8(want))


@pytest.mark.parametrize("table", ["cifar", "imagenet"])
def test_frost_blend_and_texture(table):
    x = photo(32, seed=9)
    for s in range(1, 6):
        a, b = REFERENCE[table]["frost"][s - 1]
        tex = C.frost_texture(32, 32, rng(s), 0.2 if table == "cifar" else 1.0)
        np.testing.assert_array_equal(C.corrupt(x, "frost", s, rng(s), table), to_u8(a * x + b * tex.astype(float)))
    tex = C.frost_texture(48, 40, rng(0))
    assert tex.shape == (48, 40, 3) and tex.dtype == np.uint8
    mean = tex.reshape(-1, 3).mean(0) / 255
    assert mean[0] < mean[1] < mean[2] and 0.3 < mean[2] < 0.9  # bluish white, like the photos
    assert 0.05 < (tex.mean(2) / 255).std() < 0.2
    np.testing.assert_array_equal(tex, C.frost_texture(48, 40, rng(0)))


def elastic_ref(x: np.ndarray, c, table: str, g: np.random.Generator) -> np.ndarray:
    """The reference's elastic_transform with scipy's affine_transform for OpenCV's warpAffine."""
    h, w = x.shape[:2]
    alpha, sigma, aff = (v * min(h, w) / {"cifar": 32, "imagenet": 224}[table] for v in c)
    y = x.astype(np.float32) / 255
    cen, sq = np.float32([w // 2, h // 2]), min(h, w) // 3
    p1 = np.float32([cen + sq, [cen[0] + sq, cen[1] - sq], cen - sq])
    p2 = p1 + g.uniform(-aff, aff, size=p1.shape).astype(np.float32)
    # solve the 6 unknowns of x' = a x + b y + c, y' = d x + e y + f
    A = np.zeros((6, 6))
    A[0::2, 0:2], A[0::2, 2], A[1::2, 3:5], A[1::2, 5] = p1, 1, p1, 1
    m = np.linalg.solve(A, p2.astype(np.float64).ravel()).reshape(2, 3)
    inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))
    mat = np.array([[inv[1, 1], inv[1, 0]], [inv[0, 1], inv[0, 0]]])  # (row, col) order
    y = np.stack([ndimage.affine_transform(y[..., k], mat, (inv[1, 2], inv[0, 2]), order=1, mode="mirror")
                  for k in range(3)], -1)
    dx = (ndimage.gaussian_filter(g.uniform(-1, 1, (h, w)), sigma, mode="reflect", truncate=3) * alpha)
    dy = (ndimage.gaussian_filter(g.uniform(-1, 1, (h, w)), sigma, mode="reflect", truncate=3) * alpha)
    rr, cc = np.mgrid[0:h, 0:w]
    y = np.stack([ndimage.map_coordinates(y[..., k], (rr + dy.astype(np.float32), cc + dx.astype(np.float32)),
                                          order=1, mode="reflect") for k in range(3)], -1)
    return np.clip(y, 0, 1) * 255


@pytest.mark.parametrize("table", ["cifar", "imagenet"])
def test_elastic_closed_form(table):
    x = photo(32, 40, seed=10)
    for s in range(1, 6):
        want = elastic_ref(x, REFERENCE[table]["elastic_transform"][s - 1], table, rng(s))
        assert_close(C.corrupt(x, "elastic_transform", s, rng(s), table), to_u8(want))


def test_spatter_mud_closed_form_and_water_properties():
    x = photo(32, seed=11)
    for s in (4, 5):  # CIFAR's mud severities
        c = REF_CIFAR["spatter"][s - 1]
        liquid = gauss_ref(rng(s).normal(c[0], c[1], (32, 32)), c[2])
        liquid[liquid < c[3]] = 0
        m = gauss_ref((liquid > c[3]).astype(np.float32), c[4])
        m[m < 0.8] = 0
        want = x / 255 * (1 - m[..., None]) + np.array([63, 42, 20]) / 255 * m[..., None]
        assert_close(C.corrupt(x, "spatter", s, rng(s), "cifar"), to_u8(np.clip(want, 0, 1) * 255))
    for s in (1, 2, 3):  # water only adds pale turquoise: never darker (but for the truncation's level)
        out = C.corrupt(x, "spatter", s, rng(s), "imagenet").astype(int)
        assert (out >= x.astype(int) - 1).all() and (out > x.astype(int) + 2).any()


def test_spatter_helpers_match_definitions():
    g = rng(0)
    edges = g.random((12, 14)) < 0.04
    # the 5 x 5 chamfer distance is a shortest path over steps 1 (axial), 1.4 (diagonal), 2.1969 (knight)
    h, w = edges.shape
    graph = lil_matrix((h * w, h * w))
    steps = [(0, 1, 1), (1, 0, 1), (1, 1, 1.4), (1, -1, 1.4), (1, 2, 2.1969), (2, 1, 2.1969), (1, -2, 2.1969),
             (2, -1, 2.1969)]
    for yy in range(h):
        for xx in range(w):
            for dy, dx, cost in steps:
                if 0 <= yy + dy < h and 0 <= xx + dx < w:
                    graph[yy * w + xx, (yy + dy) * w + xx + dx] = cost
    want = dijkstra(graph.tocsr(), directed=False, indices=np.flatnonzero(edges.ravel()), min_only=True)
    got = C._chamfer_distance(edges, 20)
    np.testing.assert_allclose(np.minimum(got, 20).ravel(), np.minimum(want, 20), atol=1e-9)
    img = g.integers(3, 40, (9, 11)).astype(np.uint8)
    hist = np.bincount(img.ravel(), minlength=256)
    first = np.flatnonzero(hist)[0]
    lut = np.rint((np.cumsum(hist) - hist[first]) * 255 / (img.size - hist[first]))
    np.testing.assert_array_equal(C._equalize_hist(img), lut[img].astype(np.uint8))
    step = np.zeros((16, 16), np.uint8)
    step[:, 8:] = 200
    e = C._canny(step, 50, 150)
    assert e[:, 7:9].any(axis=1).all() and not e[:, :6].any() and not e[:, 10:].any()
    assert not C._canny(np.full((16, 16), 90, np.uint8), 50, 150).any()


# ------------------------------------------------------------------------------------ general behaviour


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(float) - b.astype(float)) ** 2)
    return 10 * np.log10(255**2 / max(mse, 1e-12))


# Where the reference's own constants do not make damage (as PSNR) grow with severity, and why:
NOT_MONOTONE = {
    # severities 1-2 desaturate (x0.3, x0.1), 3-5 oversaturate: two directions
    ("saturate", "cifar"), ("saturate", "imagenet"),
    # a warp's PSNR measures displacement; the severities trade displacement against smoothness (ImageNet 1-2:
    # alpha 488 px over sigma 171 / 20 px; CIFAR 1: an affine move of up to 2.6 px only)
    ("elastic_transform", "cifar"), ("elastic_transform", "imagenet"),
    # sigma traded against passes (CIFAR 3: sigma 0.4, 1 pass; 4: sigma 0.25, 2 passes)
    ("glass_blur", "cifar"), ("glass_blur", "imagenet"),
    # the image weight falls as the frost weight rises; the reference's photos give the same shape (measured
    # at 32 px: 19.0, 15.5, 14.9, 15.9, 16.2 dB)
    ("frost", "cifar"), ("frost", "imagenet"),
    # 32 px sides 30, 28, 27, 24, 20: the resampling phase decides between neighbours
    ("pixelate", "cifar"),
    # severities 1-3 are water, 4-5 mud
    ("spatter", "cifar"),
}


@pytest.mark.parametrize("table,size,seeds", [("cifar", 32, 4), ("imagenet", 224, 2)])
def test_damage_grows_with_severity(table, size, seeds):
    x = photo(size, seed=12)
    for name in C.ALL_CORRUPTIONS:
        p = [np.mean([psnr(x, C.corrupt(x, name, s, rng(k), table)) for k in range(seeds)]) for s in range(1, 6)]
        assert max(p) < 40, (name, p)  # every severity visibly damages
        if (name, table) not in NOT_MONOTONE:
            # 0.5 dB slack: CIFAR motion blur 3 and 4 differ only in taps weighing < 1e-4; snow is noisy
            assert all(p[i + 1] < p[i] + 0.5 for i in range(4)), (name, p)
            assert p[4] < p[0] - 1, (name, p)


@pytest.mark.parametrize("name", C.ALL_CORRUPTIONS)
def test_shapes_dtypes_inputs_and_determinism(name):
    x = photo(40, 56, seed=13)
    before = x.copy()
    state = np.random.get_state()[1].copy()
    out = C.corrupt(x, name, 3, rng(5))
    assert out.shape == (40, 56, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(x, before)  # the input is not modified
    np.testing.assert_array_equal(out, C.corrupt(x, name, 3, rng(5)))  # same generator state, same output
    np.testing.assert_array_equal(out, C.corrupt(Image.fromarray(x), name, 3, rng(5)))  # PIL input
    np.testing.assert_array_equal(np.random.get_state()[1], state)  # numpy's global generator untouched
    if name in RANDOM:
        assert not np.array_equal(out, C.corrupt(x, name, 3, rng(6)))
    grey = C.corrupt(x[..., 0], name, 3, rng(5), "imagenet")  # (H, W) input -> RGB output
    assert grey.shape == (40, 56, 3)
    big = C.corrupt(photo(72, 90, seed=14), name, 5, rng(0))  # "auto" -> imagenet constants
    assert big.shape == (72, 90, 3) and big.dtype == np.uint8


def test_bad_arguments():
    x = photo(32)
    with pytest.raises(ValueError, match="known: gaussian_noise, shot_noise"):
        C.corrupt(x, "gaussian", 1, rng())
    for bad in (0, 6, 2.0, True, "3"):
        with pytest.raises(ValueError, match="severity"):
            C.corrupt(x, "contrast", bad, rng())
    with pytest.raises(TypeError, match="Generator"):
        C.corrupt(x, "contrast", 1, 0)
    with pytest.raises(TypeError, match="uint8"):
        C.corrupt(x / 255.0, "contrast", 1, rng())
    with pytest.raises(ValueError, match="too small"):
        C.corrupt(x[:4], "contrast", 1, rng())
    with pytest.raises(ValueError, match="constants"):
        C.corrupt(x, "contrast", 1, rng(), "tiny")


# -------------------------------------------------------------------------------------------- the CLI


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """2 classes x 3 real 32 px JPEGs, plus one broken file; the scan cache kept in tmp_path."""
    monkeypatch.setenv("DIFFAUG_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "src"
    for ci, cls in enumerate(["cat", "dog"]):
        (src / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(photo(32, seed=10 * ci + i)).save(src / cls / f"im{i}.jpg", quality=90)
    (src / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    return src


def run_cli(*args) -> dict:
    return cli.main([*map(str, args), "--workers", "0", "--no-progress"])


def test_cli_layout_resume_and_manifest(folder, tmp_path, capsys):
    dst = tmp_path / "dst"
    man = run_cli(folder, dst)
    assert "broken.jpg" in capsys.readouterr().err  # the unreadable image is named, then skipped
    files = sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file())
    want = sorted(f"{c}/{s}/{cls}/im{i}.{'jpg' if c == 'jpeg_compression' else 'png'}"
                  for c in C.ALL_CORRUPTIONS for s in range(1, 6) for cls in ("cat", "dog") for i in range(3))
    assert files == sorted(want + ["manifest.json"])
    assert man["counts"]["written"] == len(want) and man["counts"]["bad_images"] == 1
    on_disk = json.loads((dst / "manifest.json").read_text())
    assert on_disk["status"] == "complete" and on_disk["constants"]["images_per_table"] == {"cifar": 6}
    assert on_disk["complete"]["fog"] == [1, 2, 3, 4, 5] and on_disk["bad_images"][0][0].endswith("broken.jpg")
    assert on_disk["constants"]["tables"]["cifar"]["contrast"] == list(REF_CIFAR["contrast"])

    # contents: each file is corrupt() of its source with the documented per-image seed
    src_img = np.asarray(Image.open(folder / "dog" / "im1.jpg").convert("RGB"))
    index = 4  # sorted listing: cat/im0..2, dog/im0 (broken.jpg is not an image), dog/im1
    for c, s in [("snow", 2), ("glass_blur", 5), ("gaussian_noise", 1)]:
        got = np.asarray(Image.open(dst / c / str(s) / "dog" / "im1.png"))
        want_img = C.corrupt(src_img, c, s, np.random.default_rng(cli.image_seed(0, c, s, index)))
        np.testing.assert_array_equal(got, want_img)
    assert (dst / "jpeg_compression/3/dog/im1.jpg").read_bytes() == C.jpeg_compression_bytes(src_img, 3)

    # resume: delete one output, rerun: only it is written again, identically
    mtimes = {p: p.stat().st_mtime_ns for p in dst.rglob("*.*") if p.name != "manifest.json"}
    gone = dst / "fog/3/cat/im2.png"
    old = gone.read_bytes()
    gone.unlink()
    man = run_cli(folder, dst)
    assert man["counts"]["written"] == 1 and man["counts"]["already_present"] == len(want) - 1
    assert gone.read_bytes() == old
    changed = [p for p, t in mtimes.items() if p.stat().st_mtime_ns != t]
    assert changed == [gone]

    # another seed into the same DST is refused, naming the setting; --overwrite remakes what is asked
    with pytest.raises(SystemExit, match="seed"):
        run_cli(folder, dst, "--seed", "1")
    man = run_cli(folder, dst, "--seed", "1", "--overwrite", "--corruptions", "contrast,gaussian_noise",
                  "--severities", "2")
    assert man["counts"]["written"] == 12 and man["complete"] == {"contrast": [2], "gaussian_noise": [2]}


def test_cli_selection_parsing():
    assert cli.parse_corruptions("all") == C.ALL_CORRUPTIONS
    assert cli.parse_corruptions("validation") == C.VALIDATION_CORRUPTIONS
    assert cli.parse_corruptions("standard") == C.CORRUPTIONS
    assert cli.parse_corruptions("fog,noise") == ("gaussian_noise", "shot_noise", "impulse_noise", "fog")
    assert cli.parse_severities("1-5") == (1, 2, 3, 4, 5)
    assert cli.parse_severities("5,1,2-3") == (1, 2, 3, 5)
    assert cli.parse_args(["a", "b"]).corruptions == C.ALL_CORRUPTIONS  # default: the 15 + the 4


def test_cli_errors(folder, tmp_path):
    dst = tmp_path / "out"
    cases = [
        ((tmp_path / "nope", dst), "no such directory"),
        ((folder, folder / "cat" / "inside"), "inside SRC"),
        ((folder, dst, "--corruptions", "fog,blurr"), "unknown corruption 'blurr'; known: gaussian_noise"),
        ((folder, dst, "--severities", "0-3"), "outside 1-5"),
        ((folder, dst, "--severities", "6"), "outside 1-5"),
        ((folder, dst, "--severities", "x"), "expected a range"),
    ]
    (tmp_path / "empty").mkdir()
    cases.append(((tmp_path / "empty", dst), "no class folders"))
    (tmp_path / "hollow" / "cls").mkdir(parents=True)
    (tmp_path / "hollow" / "cls" / "notes.txt").write_text("hi")
    cases.append(((tmp_path / "hollow", dst), "no valid images"))
    (tmp_path / "afile").write_text("x")
    cases.append(((folder, tmp_path / "afile"), "is a file"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    cases.append(((folder, tmp_path / "full"), "not empty"))
    for args, msg in cases:
        with pytest.raises(SystemExit) as e:
            run_cli(*args)
        text = str(e.value.code)
        assert msg in text and "\n" not in text, (args, text)
    assert not dst.exists()  # nothing was written for a refused command
    assert not os.path.exists(folder / "cat" / "inside")
