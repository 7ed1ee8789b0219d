"""The image filters the corruptions are built from (kernels, zoom, plasma fractal, frost texture, HSV,
Canny edges, chamfer distance, histogram equalisation), in numpy/scipy."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["motion_blur_kernel", "plasma_fractal", "frost_texture"]

# skimage.filters.gaussian's defaults, which the reference's gaussian() calls use
_GAUSS_MODE, _GAUSS_TRUNCATE = "nearest", 4.0


def _to_uint8(y: np.ndarray) -> np.ndarray:
    # truncation, as the reference's np.uint8(float image)
    return np.clip(y, 0, 255).astype(np.uint8)


def _gaussian(x: np.ndarray, sigma: float, mode: str = _GAUSS_MODE, truncate: float = _GAUSS_TRUNCATE) -> np.ndarray:
    """skimage.filters.gaussian as the reference calls it: spatial axes only, float64 out."""
    sig = (sigma, sigma, 0) if x.ndim == 3 else sigma
    return ndimage.gaussian_filter(np.asarray(x, dtype=np.float64), sig, mode=mode, truncate=truncate)


def _cv_gaussian_kernel(ksize: int, sigma: float) -> np.ndarray:
    """cv2.getGaussianKernel(ksize, sigma): normalized exp(-(i - (ksize-1)/2)^2 / (2 sigma^2))."""
    i = np.arange(ksize) - (ksize - 1) / 2
    k = np.exp(-(i**2) / (2 * sigma**2))
    return k / k.sum()


def _disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """Defocus kernel: a normalized disk (17 x 17 up to radius 8), anti-aliased by a 3 x 3 (or 5 x 5 beyond
    radius 8) Gaussian of sigma ``alias_blur`` with mirrored borders (cv2.GaussianBlur)."""
    if radius <= 8:
        coords, ksize = np.arange(-8, 8 + 1), 3
    else:
        coords, ksize = np.arange(-radius, radius + 1), 5
    xx, yy = np.meshgrid(coords, coords)
    disk = (xx**2 + yy**2 <= radius**2).astype(np.float32)
    disk /= disk.sum()
    g = _cv_gaussian_kernel(ksize, alias_blur)
    disk = ndimage.correlate1d(disk, g, axis=0, mode="mirror")
    return ndimage.correlate1d(disk, g, axis=1, mode="mirror")


def motion_blur_kernel(radius: float, sigma: float, angle: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ImageMagick's MotionBlurImage kernel: (weights, dy, dx), each (2 * ceil(radius) + 1,).

    Output pixel (y, x) = sum_i weights[i] * input(y + dy[i], x + dx[i]); weights[i] ~ exp(-i^2 / (2 sigma^2))
    summed to 1, dx[i] = ceil(i cos(angle) - 0.5), dy[i] = ceil(i sin(angle) - 0.5), angle in degrees."""
    width = 2 * int(np.ceil(radius)) + 1
    i = np.arange(width, dtype=np.float64)
    w = np.exp(-(i**2) / (2 * sigma**2))
    t = np.deg2rad(angle)
    dx = np.ceil(i * np.cos(t) - 0.5).astype(np.int64)
    dy = np.ceil(i * np.sin(t) - 0.5).astype(np.int64)
    return w / w.sum(), dy, dx


def _motion_blur(x: np.ndarray, radius: float, sigma: float, angle: float) -> np.ndarray:
    """Motion-blur an (H, W, C) float image (edge pixels repeated outside), rounded to integer levels as
    ImageMagick's 8-bit output is."""
    w, dy, dx = motion_blur_kernel(radius, sigma, angle)
    pad = int(max(np.abs(dy).max(), np.abs(dx).max()))
    h, wd = x.shape[:2]
    xp = np.pad(np.asarray(x, dtype=np.float64), ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    out = np.zeros((h, wd, x.shape[2]))
    for wi, oy, ox in zip(w, dy, dx):  # one shifted copy per tap: ~20 taps, cheaper than a 41 x 41 2-D kernel
        out += wi * xp[pad + oy : pad + oy + h, pad + ox : pad + ox + wd]
    return np.rint(np.clip(out, 0, 255))


def _clipped_zoom(img: np.ndarray, zoom: float) -> np.ndarray:
    """Zoom the centre of an (H, W, C) image by ``zoom`` >= 1 (bilinear) and crop the middle H x W."""
    h, w = img.shape[:2]
    ch, cw = int(np.ceil(h / zoom)), int(np.ceil(w / zoom))
    top, left = (h - ch) // 2, (w - cw) // 2
    out = ndimage.zoom(img[top : top + ch, left : left + cw], (zoom, zoom, 1), order=1)
    th, tw = (out.shape[0] - h) // 2, (out.shape[1] - w) // 2
    return out[th : th + h, tw : tw + w]


def plasma_fractal(mapsize: int, wibbledecay: float, rng: np.random.Generator) -> np.ndarray:
    """Diamond-square height map (the reference's fog): float64 (mapsize, mapsize) in [0, 1], min 0, max 1.

    mapsize: a power of two. Each level sets square centres, then diamond centres, to the mean of their four
    neighbours (wrapping around) plus uniform noise in +-wibble^2; wibble starts at 100 and is divided by
    ``wibbledecay`` per level (larger decay: smoother map). Draws: per level, rng.uniform for the squares,
    then the two diamond sets (row-offset points, then column-offset points)."""
    if mapsize < 2 or mapsize & (mapsize - 1):
        raise ValueError(f"mapsize must be a power of two >= 2, got {mapsize}")
    n = mapsize
    a = np.zeros((n, n))
    step, wibble = n, 100.0

    def noisy_mean(total: np.ndarray) -> np.ndarray:
        return total / 4 + wibble * rng.uniform(-wibble, wibble, total.shape)

    while step >= 2:
        half = step // 2
        corners = a[0:n:step, 0:n:step]
        total = corners + np.roll(corners, -1, axis=0)
        total += np.roll(total, -1, axis=1)
        a[half:n:step, half:n:step] = noisy_mean(total)
        centres, corners = a[half:n:step, half:n:step], a[0:n:step, 0:n:step]
        total = (centres + np.roll(centres, 1, axis=0)) + (corners + np.roll(corners, -1, axis=1))
        a[0:n:step, half:n:step] = noisy_mean(total)
        total = (centres + np.roll(centres, 1, axis=1)) + (corners + np.roll(corners, -1, axis=0))
        a[half:n:step, 0:n:step] = noisy_mean(total)
        step = half
        wibble /= wibbledecay
    a -= a.min()
    return a / a.max()


def _next_pow2(n: int) -> int:
    return 1 << max(1, int(n - 1).bit_length())


# Frost photo statistics the synthetic texture matches, measured on the five photos the reference draws from
# (frost1-5): per-channel mean R 0.57, G 0.66, B 0.70 of full scale (B/R 0.81, B/G 0.93 on average), each
# photo's own mean brightness 0.40-0.82 and grey-level std 0.06-0.17.
_FROST_TINT = np.array([0.81, 0.93, 1.0])


def frost_texture(height: int, width: int, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """A synthetic frost layer: uint8 (height, width, 3), bluish white, our stand-in for the frost photos.

    A cloudy base (``plasma_fractal``, decay 1.6) plus ice needles: straight segments of length 4-20 px x
    ``scale`` at random angles, each with three side branches at +-60 degrees (ice grows hexagonally),
    splatted and blurred by ~0.6 px x scale; normalized to a random mean blue level in [0.5, 0.8] and a
    grey-level std of 0.13, then tinted like the photos. scale 0.2 gives the finer texture of the CIFAR
    script's 0.2x photos. Draws: plasma, then needle parameters, then the level."""
    haze = plasma_fractal(_next_pow2(max(height, width)), 1.6, rng)[:height, :width]
    n = max(1, round(height * width / (120 * scale**2)))
    length = scale * rng.uniform(4, 20, n)
    x0, y0 = rng.uniform(0, width, n), rng.uniform(0, height, n)
    angle = rng.uniform(0, np.pi, n)
    bright = rng.uniform(0.5, 1.0, n)
    # three side branches per needle: start along it, turn by +-60 degrees, 0.2-0.4 of its length
    at = rng.uniform(0.2, 0.9, (n, 3)) * length[:, None]
    turn = rng.choice([-np.pi / 3, np.pi / 3], (n, 3))
    blen = rng.uniform(0.2, 0.4, (n, 3)) * length[:, None]
    bx, by = x0[:, None] + at * np.cos(angle)[:, None], y0[:, None] + at * np.sin(angle)[:, None]
    seg_x = np.concatenate([x0, bx.ravel()])
    seg_y = np.concatenate([y0, by.ravel()])
    seg_a = np.concatenate([angle, (angle[:, None] + turn).ravel()])
    seg_l = np.concatenate([length, blen.ravel()])
    seg_b = np.concatenate([bright, np.repeat(bright, 3) * 0.8])
    # points every 0.5 px along every segment
    steps = np.maximum(1, np.ceil(seg_l / 0.5).astype(np.int64))
    seg = np.repeat(np.arange(seg_l.size), steps)
    t = (np.arange(seg.size) - np.repeat(np.cumsum(steps) - steps, steps)) * 0.5
    px = np.clip(np.rint(seg_x[seg] + t * np.cos(seg_a[seg])), 0, width - 1).astype(np.int64)
    py = np.clip(np.rint(seg_y[seg] + t * np.sin(seg_a[seg])), 0, height - 1).astype(np.int64)
    acc = np.zeros((height, width))
    np.add.at(acc, (py, px), seg_b[seg])
    crystals = 1 - np.exp(-ndimage.gaussian_filter(acc, max(0.5, 0.6 * scale)))
    tex = 0.45 * haze + 0.55 * crystals
    level = rng.uniform(0.5, 0.8)
    tex = level + 0.13 * (tex - tex.mean()) / max(tex.std(), 1e-6)
    rgb = np.clip(tex, 0, 1)[..., None] * _FROST_TINT
    return (rgb * 255).astype(np.uint8)


def _rgb_to_hsv(x: np.ndarray) -> np.ndarray:
    """RGB in [0, 1] -> HSV in [0, 1] (hue as a fraction of a turn), as skimage.color.rgb2hsv."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v = x.max(axis=-1)
    delta = v - x.min(axis=-1)
    safe = np.where(delta == 0, 1.0, delta)
    h = np.where(r == v, (g - b) / safe, 0.0)
    h = np.where(g == v, 2.0 + (b - r) / safe, h)
    h = np.where(b == v, 4.0 + (r - g) / safe, h)
    h = np.where(delta == 0, 0.0, (h / 6.0) % 1.0)
    s = np.where(delta == 0, 0.0, delta / np.where(v == 0, 1.0, v))
    return np.stack([h, s, v], axis=-1)


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """HSV in [0, 1] -> RGB in [0, 1], as skimage.color.hsv2rgb."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    i = np.floor(h * 6.0)
    f = h * 6.0 - i
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    i = i.astype(np.int64) % 6
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.stack([r, g, b], axis=-1)




def _canny(img: np.ndarray, low: float, high: float) -> np.ndarray:
    """cv2.Canny(img, low, high) for uint8 (H, W): 3 x 3 Sobel (edges repeated), L1 magnitude, non-maximum
    suppression along the gradient's 45-degree sector, hysteresis (8-connected). Returns bool (H, W)."""
    f = img.astype(np.float64)
    gx = ndimage.sobel(f, axis=1, mode="nearest")
    gy = ndimage.sobel(f, axis=0, mode="nearest")
    mag = np.abs(gx) + np.abs(gy)
    p = np.pad(mag, 1)
    h, w = mag.shape

    def nb(dy: int, dx: int) -> np.ndarray:
        return p[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    ax, ay = np.abs(gx), np.abs(gy)
    tan22, tan67 = np.tan(np.deg2rad(22.5)), np.tan(np.deg2rad(67.5))
    horizontal = ay < ax * tan22
    vertical = ay > ax * tan67
    s = np.where(gx * gy < 0, -1, 1)
    diag = np.where(s > 0, (mag > nb(-1, -1)) & (mag > nb(1, 1)), (mag > nb(-1, 1)) & (mag > nb(1, -1)))
    # OpenCV's tie rule: strictly above the neighbour before, at least the one after
    peak = np.where(horizontal, (mag > nb(0, -1)) & (mag >= nb(0, 1)),
                    np.where(vertical, (mag > nb(-1, 0)) & (mag >= nb(1, 0)), diag))
    candidate = peak & (mag > low)
    labels, n = ndimage.label(candidate, structure=np.ones((3, 3)))
    if n == 0:
        return candidate
    strong = np.zeros(n + 1, dtype=bool)
    strong[np.unique(labels[candidate & (mag > high)])] = True
    strong[0] = False
    return strong[labels]


def _box3(x: np.ndarray) -> np.ndarray:
    """cv2.blur(x, (3, 3)): 3 x 3 mean, mirrored borders. Summed, then divided: integer-valued sums of 9
    stay exact, so a later uint8 truncation agrees with OpenCV's (a product of thirds can land at 2.999...)."""
    return ndimage.correlate(np.asarray(x, dtype=np.float64), np.ones((3, 3)), mode="mirror") / 9


def _chamfer_distance(edges: np.ndarray, cap: float) -> np.ndarray:
    """cv2.distanceTransform(non-edges, DIST_L2, 5) up to ``cap``: the 5 x 5 chamfer distance (steps 1,
    1.4 and 2.1969 as OpenCV weighs them) from each pixel to the nearest ``edges`` pixel, nothing outside
    the image; values above ``cap`` come back as >= cap (inf without edges). Relaxed to a fixed point:
    every step adds >= 1, so cap + 1 rounds settle every distance <= cap."""
    a, b, c = 1.0, 1.4, 2.1969
    steps = [(0, 1, a), (0, -1, a), (1, 0, a), (-1, 0, a), (1, 1, b), (1, -1, b), (-1, 1, b), (-1, -1, b)]
    steps += [(dy, dx, c) for dy, dx in ((1, 2), (2, 1), (-1, 2), (-2, 1), (1, -2), (2, -1), (-1, -2), (-2, -1))]
    h, w = edges.shape
    d = np.where(edges, 0.0, np.inf)
    for _ in range(int(np.ceil(cap)) + 1):
        p = np.pad(d, 2, constant_values=np.inf)
        new = d.copy()
        for dy, dx, step in steps:
            np.minimum(new, p[2 + dy : 2 + dy + h, 2 + dx : 2 + dx + w] + step, out=new)
        if np.array_equal(new, d):
            break
        d = new
    return d


def _equalize_hist(x: np.ndarray) -> np.ndarray:
    """cv2.equalizeHist for uint8: lut = round(255 * (cdf - first count) / (N - first count))."""
    hist = np.bincount(x.ravel(), minlength=256)
    first = int(np.flatnonzero(hist)[0])
    if hist[first] == x.size:
        return np.full_like(x, first)
    lut = np.rint((np.cumsum(hist) - hist[first]) * (255.0 / (x.size - hist[first])))
    lut[: first + 1] = 0
    return np.clip(lut, 0, 255).astype(np.uint8)[x]


