"""A generated multispectral land-cover set seen through several sensors.

Each *scene* is a land-cover label map and a surface-reflectance cube; each
*domain* is a sensor/illumination that renders the same reflectance into
digital numbers (DN) differently, so a class keeps its spectral *shape*
while absolute values move between domains (the setting SpectralMoE and
other domain-generalisation methods address).

Scene (pure function of ``(seed, split, index)``):

- layout: one smooth random field per class (white noise low-passed with a
  Gaussian of random width, periodic), 2 to K classes present, label =
  argmax: smooth regions of a few tens of pixels;
- reflectance rho(x) = b(x) * S_k, with S_k the class spectrum
  (:data:`REFLECTANCE`, Sentinel-2-like bands blue, green, red, NIR,
  SWIR1, SWIR2; other band counts are interpolated) and a class texture b:
  water nearly flat, forest fine crown clumps, cropland rows (a striped
  mixture with the bare-soil spectrum), bare soil broad moisture patches,
  built-up blocks; per scene, each class spectrum is scaled by U(0.8,
  1.25) and each of its bands by 1 + 0.06 N(0, 1); then 4 % per-pixel,
  per-band variation and a sensor blur
  (Gaussian, sigma 0.6 px) that mixes pixels at boundaries.

Domain d (:class:`SensorDomain`) renders rho as::

    DN = round(1e4 * (s * G X rho + o + n)),  clipped to uint16

G = diag(gains) (band gains), X the cross-talk matrix (each band takes a
fraction c of each neighbour's signal, rows sum to 1), s the illumination (per
image, s = illumination * (1 + jitter * U(-1, 1))), o per-band offsets
(haze: larger at short wavelengths), n Gaussian noise. Domain ``A`` is the
reference (unit gains, no cross-talk, low noise); the others shift further
with their index (:func:`make_domains`). :func:`make_random_domains` draws
sensors ``R00``, ``R01``, ... at random severities instead (a pretraining
set with spectral variety but none of the benchmark's sensors).

Written files (``out`` is ``data/synthetic_multispectral`` by default)::

    out/meta.json                          classes, palette, bands, domains,
                                           per-domain band mean / std (DN)
    out/{domain}/img/{split}/{index:05d}.npy   H x W x bands uint16 DN
    out/{domain}/ann/{split}/{index:05d}.png   H x W uint8 class index

Every domain holds the same scenes (and labels) for every split, so
per-domain scores on ``val`` compare the same pictures.
"""
import io
import json
import os
import os.path as osp
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import mmengine.fileio as fileio
import numpy as np
from mmcv.transforms import BaseTransform

from mmseg.datasets import BaseSegDataset
from mmseg.registry import DATASETS, TRANSFORMS

__all__ = [
    'BAND_NAMES', 'CLASSES', 'PALETTE', 'REFLECTANCE', 'SensorDomain',
    'class_spectra', 'make_domains', 'make_random_domains',
    'make_layout', 'make_reflectance',
    'make_scene', 'render', 'generate_multispectral_set',
    'SyntheticMultispectralDataset', 'LoadMultiBandImageFromFile'
]

#: Bands of the default 6-band sensor (Sentinel-2-like) and their centres.
BAND_NAMES: Tuple[str, ...] = ('blue', 'green', 'red', 'nir', 'swir1',
                               'swir2')
BAND_CENTRES_NM: Tuple[int, ...] = (490, 560, 665, 842, 1610, 2190)
CLASSES: Tuple[str, ...] = ('water', 'forest', 'cropland', 'bare_soil',
                            'built_up')
PALETTE: List[List[int]] = [[30, 90, 200], [20, 110, 40], [170, 210, 80],
                            [180, 140, 90], [200, 60, 60]]
#: Surface reflectance of each class (rows) in :data:`BAND_NAMES` (columns):
#: water falls off towards the infrared, vegetation has the red edge
#: (forest: high NIR, low SWIR; cropland: drier, more SWIR), bare soil
#: rises, built-up is flat and grey.
REFLECTANCE = np.array([
    [0.080, 0.060, 0.040, 0.020, 0.010, 0.005],
    [0.030, 0.060, 0.030, 0.350, 0.160, 0.070],
    [0.050, 0.090, 0.070, 0.280, 0.250, 0.150],
    [0.100, 0.140, 0.180, 0.240, 0.320, 0.280],
    [0.140, 0.150, 0.160, 0.180, 0.220, 0.200],
])
DN_SCALE = 10000.  # DN per unit reflectance (as Sentinel-2 L2A)
_SPLIT_IDS = {'train': 0, 'val': 1, 'test': 2}


def class_spectra(num_bands: int = 6) -> np.ndarray:
    """K x num_bands class spectra: :data:`REFLECTANCE`, linearly
    interpolated over band order when ``num_bands != 6``."""
    if num_bands < 2:
        raise ValueError(f'num_bands must be >= 2, got {num_bands}')
    if num_bands == REFLECTANCE.shape[1]:
        return REFLECTANCE.copy()
    pos = np.linspace(0, REFLECTANCE.shape[1] - 1, num_bands)
    anchors = np.arange(REFLECTANCE.shape[1])
    return np.stack([np.interp(pos, anchors, row) for row in REFLECTANCE])


# --------------------------------------------------------------------------
# sensors
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class SensorDomain:
    """One sensor / illumination (see the module docstring for the model).

    Attributes:
        name: folder name.
        gains: per-band gain, num_bands.
        offsets: per-band additive offset in reflectance units, num_bands.
        crosstalk: share c of each neighbour's signal in a band (X[i, i +/-
            1] = c, X[i, i] = 1 - the rest).
        illumination: mean global scale s.
        noise: std of the additive noise, reflectance units.
        jitter: per-image relative spread of s.
    """
    name: str
    gains: Tuple[float, ...]
    offsets: Tuple[float, ...]
    crosstalk: float = 0.
    illumination: float = 1.
    noise: float = 0.003
    jitter: float = 0.08

    @property
    def num_bands(self) -> int:
        return len(self.gains)

    def response_matrix(self) -> np.ndarray:
        """num_bands x num_bands ``G X``: observed = (G X) @ reflectance."""
        n, c = self.num_bands, self.crosstalk
        X = np.zeros((n, n))
        for i in range(n):
            for j in (i - 1, i + 1):
                if 0 <= j < n:
                    X[i, j] = c
            X[i, i] = 1 - X[i].sum()
        return np.diag(self.gains) @ X


def make_domains(num_bands: int = 6, num_domains: int = 3,
                 seed: int = 0) -> List[SensorDomain]:
    """``A`` (reference) and ``num_domains - 1`` shifted sensors ``B``,
    ``C``, ... with severity t = d / (num_domains - 1): gains 1 +/- 0.2 t
    (random per band), haze offsets up to 0.03 t falling with wavelength,
    cross-talk 0.08 t, illumination exp(+/- 0.4 t) (alternately brighter
    and darker), noise 0.003 + 0.008 t. Pure function of the arguments."""
    if not 1 <= num_domains <= 26:
        raise ValueError(f'num_domains must be in 1..26, got {num_domains}')
    rng = np.random.default_rng([seed, 7919])
    fall = np.linspace(1., 0.15, num_bands)  # haze: strong in the blue
    domains = [
        SensorDomain('A', gains=(1., ) * num_bands,
                     offsets=tuple(float(v) for v in 0.004 * fall))
    ]
    for d in range(1, num_domains):
        t = d / (num_domains - 1)
        gains = 1 + 0.2 * t * rng.uniform(-1, 1, num_bands)
        haze = 0.03 * t * rng.uniform(0.6, 1.) * fall
        sign = 1 if d % 2 else -1
        domains.append(
            SensorDomain(
                chr(ord('A') + d),
                gains=tuple(float(round(g, 4)) for g in gains),
                offsets=tuple(float(round(o, 4)) for o in 0.004 * fall + haze),
                crosstalk=round(0.08 * t, 4),
                illumination=round(float(np.exp(sign * 0.4 * t)), 4),
                noise=round(0.003 + 0.008 * t, 4)))
    return domains


def make_random_domains(num_bands: int = 6, num_domains: int = 8,
                        seed: int = 0) -> List[SensorDomain]:
    """``num_domains`` sensors ``R00``, ``R01``, ... drawn at random, for
    pretraining a stand-in foundation model on spectral variety.

    Each draws its own severity t ~ U(0, 1) and then the shifts of
    :func:`make_domains` at that severity: gains 1 +/- 0.2 t (random per
    band), haze up to 0.03 t, cross-talk 0.08 t, illumination
    exp(+/- 0.4 t) with a random sign, noise 0.003 + 0.008 t. The draws
    come from another random stream than :func:`make_domains`, so no
    random domain is one of its ``B``, ``C``, ... (same kind of shift,
    other values). Pure function of the arguments.
    """
    if not 1 <= num_domains <= 100:
        raise ValueError(f'num_domains must be in 1..100, got {num_domains}')
    rng = np.random.default_rng([seed, 104729])
    fall = np.linspace(1., 0.15, num_bands)
    domains = []
    for d in range(num_domains):
        t = float(rng.uniform(0, 1))
        gains = 1 + 0.2 * t * rng.uniform(-1, 1, num_bands)
        haze = 0.03 * t * rng.uniform(0.6, 1.) * fall
        sign = 1 if rng.uniform() < 0.5 else -1
        domains.append(
            SensorDomain(
                f'R{d:02d}',
                gains=tuple(float(round(g, 4)) for g in gains),
                offsets=tuple(float(round(o, 4)) for o in 0.004 * fall + haze),
                crosstalk=round(0.08 * t, 4),
                illumination=round(float(np.exp(sign * 0.4 * t)), 4),
                noise=round(0.003 + 0.008 * t, 4)))
    return domains


def render(reflectance: np.ndarray, domain: SensorDomain,
           rng: np.random.Generator) -> np.ndarray:
    """H x W x bands reflectance -> H x W x bands uint16 DN in
    ``domain``."""
    if reflectance.shape[-1] != domain.num_bands:
        raise ValueError(f'reflectance has {reflectance.shape[-1]} bands, '
                         f'domain {domain.name} {domain.num_bands}')
    s = domain.illumination * (1 + domain.jitter * rng.uniform(-1, 1))
    y = s * reflectance @ domain.response_matrix().T
    y = y + np.asarray(domain.offsets)
    y = y + domain.noise * rng.standard_normal(y.shape)
    return np.clip(np.rint(y * DN_SCALE), 0, 65535).astype(np.uint16)


# --------------------------------------------------------------------------
# scenes
# --------------------------------------------------------------------------
def _smooth(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """size x size white noise low-passed by a Gaussian of ``sigma`` px
    (periodic), scaled to unit standard deviation."""
    noise = rng.standard_normal((size, size))
    f = np.fft.fftfreq(size)
    transfer = np.exp(-2 * (np.pi * sigma)**2 * (f[:, None]**2 + f[None]**2))
    out = np.fft.ifft2(np.fft.fft2(noise) * transfer).real
    return out / (out.std() + 1e-12)


def _blur(cube: np.ndarray, sigma: float) -> np.ndarray:
    """Periodic Gaussian blur of every band of an H x W x C cube."""
    H, W = cube.shape[:2]
    fy, fx = np.fft.fftfreq(H), np.fft.fftfreq(W)
    transfer = np.exp(-2 * (np.pi * sigma)**2 * (fy[:, None]**2 + fx[None]**2))
    spec = np.fft.fft2(cube, axes=(0, 1)) * transfer[..., None]
    return np.fft.ifft2(spec, axes=(0, 1)).real


def make_layout(rng: np.random.Generator, size: int,
                num_classes: int = len(CLASSES)) -> np.ndarray:
    """size x size uint8 label map of smooth regions of 2..K classes."""
    present = rng.choice(num_classes, size=rng.integers(2, num_classes + 1),
                         replace=False)
    sigma = size * rng.uniform(0.08, 0.16)
    fields = np.full((num_classes, size, size), -np.inf)
    for k in present:
        fields[k] = _smooth(rng, size, sigma) + rng.normal(0, 0.3)
    return fields.argmax(0).astype(np.uint8)


def make_reflectance(rng: np.random.Generator, label: np.ndarray,
                     spectra: np.ndarray) -> np.ndarray:
    """H x W label map -> H x W x bands surface reflectance (float32) with
    the class textures of the module docstring."""
    size = label.shape[0]
    K = len(spectra)
    # this scene's variant of each class: brightness and a little shape
    spectra = spectra * rng.uniform(0.8, 1.25, (K, 1)) * (
        1 + 0.06 * rng.standard_normal(spectra.shape))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    texture = {
        # water: nearly flat
        0: 1 + 0.03 * _smooth(rng, size, size / 8),
        # forest: crown clumps
        1: 1 + 0.2 * _smooth(rng, size, 0.8),
        # bare soil: broad moisture patches
        3: 1 + 0.15 * _smooth(rng, size, size / 6),
    }
    # built-up: blocks of 3-6 px
    block = int(rng.integers(3, 7))
    cells = rng.uniform(0.7, 1.3, (size // block + 1, ) * 2)
    texture[4] = np.kron(cells, np.ones((block, block)))[:size, :size]
    cube = np.empty(label.shape + (spectra.shape[1], ))
    for k in range(K):
        cube[label == k] = spectra[k]
    for k, b in texture.items():
        if k < K:
            m = label == k
            cube[m] *= np.clip(b, 0.3, 2.)[m, None]
    if K > 3:
        # cropland: rows, a striped mixture with bare soil
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(3.5, 7.)
        phase = (xx * np.cos(theta) + yy * np.sin(theta)) / period
        soil = 0.35 * (0.5 + 0.5 * np.sin(2 * np.pi * phase))
        m = label == 2
        cube[m] = ((1 - soil[m, None]) * spectra[2] +
                   soil[m, None] * spectra[3])
    cube *= 1 + 0.04 * rng.standard_normal(cube.shape)
    return np.clip(_blur(cube, 0.6), 0, None).astype(np.float32)


def make_scene(seed: int, split: str, index: int, img_size: int = 56,
               num_bands: int = 6) -> Tuple[np.ndarray, np.ndarray]:
    """(label H x W uint8, reflectance H x W x bands float32) of scene
    ``index`` of ``split``; a pure function of the arguments."""
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
    label = make_layout(rng, img_size)
    return label, make_reflectance(rng, label, class_spectra(num_bands))


def generate_multispectral_set(out_dir: str,
                               *,
                               num_train: int = 320,
                               num_val: int = 64,
                               img_size: int = 56,
                               num_bands: int = 6,
                               num_domains: int = 3,
                               seed: int = 0,
                               random_domains: int = 0,
                               progress: bool = True) -> Dict:
    """Write the set under ``out_dir`` (layout in the module docstring).

    ``random_domains > 0`` renders the scenes in that many random sensors
    ``R00``, ``R01``, ... (:func:`make_random_domains`) instead of ``A``,
    ``B``, ... (``num_domains`` is then not used): a pretraining set for a
    stand-in foundation model, with other scenes when ``seed`` differs.

    Returns:
        the ``meta.json`` content: classes, palette, bands, sizes, the
        domains and, per domain, the band mean / std (DN) of its training
        images (domain ``A``'s are the normalisation of the configs).
    """
    from PIL import Image  # pillow comes with mmcv

    if img_size < 16:
        raise ValueError(f'img_size must be >= 16, got {img_size}')
    if num_train < 1 or num_val < 1:
        raise ValueError('num_train and num_val must be >= 1, got '
                         f'{num_train}, {num_val}')
    if random_domains:
        domains = make_random_domains(num_bands, random_domains, seed)
    else:
        domains = make_domains(num_bands, num_domains, seed)
    splits = (('train', num_train), ('val', num_val))
    bar = None
    if progress:
        from mmengine.utils import ProgressBar
        bar = ProgressBar(num_train + num_val)
    stats = {d.name: np.zeros((3, num_bands)) for d in domains}
    counts = np.zeros(len(CLASSES), dtype=np.int64)
    for split, num in splits:
        for d in domains:
            for sub in ('img', 'ann'):
                os.makedirs(osp.join(out_dir, d.name, sub, split),
                            exist_ok=True)
        for index in range(num):
            label, rho = make_scene(seed, split, index, img_size, num_bands)
            if split == 'train':
                counts += np.bincount(label.ravel(), minlength=len(CLASSES))
            name = f'{index:05d}'
            for n, d in enumerate(domains):
                rng = np.random.default_rng(
                    [seed, _SPLIT_IDS[split], index, 1000 + n])
                img = render(rho, d, rng)
                root = osp.join(out_dir, d.name)
                np.save(osp.join(root, 'img', split, name + '.npy'), img)
                Image.fromarray(label).save(
                    osp.join(root, 'ann', split, name + '.png'))
                if split == 'train':
                    flat = img.reshape(-1, num_bands).astype(np.float64)
                    stats[d.name] += np.stack([
                        np.full(num_bands, len(flat)),
                        flat.sum(0), (flat**2).sum(0)])
            if bar is not None:
                bar.update()
    band_stats = {}
    for name, (n, s1, s2) in stats.items():
        mean = s1 / n
        std = np.sqrt(np.maximum(s2 / n - mean**2, 0))
        band_stats[name] = dict(mean=[round(float(v), 2) for v in mean],
                                std=[round(float(v), 2) for v in std])
    meta = dict(
        classes=list(CLASSES),
        palette=PALETTE,
        bands=list(BAND_NAMES) if num_bands == len(BAND_NAMES) else
        [f'band{i}' for i in range(num_bands)],
        num_bands=num_bands,
        img_size=img_size,
        seed=seed,
        dn_scale=DN_SCALE,
        splits=dict(splits),
        class_pixels_train=[int(c) for c in counts],
        domains=[asdict(d) for d in domains],
        band_stats=band_stats)
    with open(osp.join(out_dir, 'meta.json'), 'w') as f:
        json.dump(meta, f, indent=1)
    return meta


# --------------------------------------------------------------------------
# mmseg dataset and loading
# --------------------------------------------------------------------------
@DATASETS.register_module()
class SyntheticMultispectralDataset(BaseSegDataset):
    """One domain of the generated set: ``data_root`` =
    ``data/synthetic_multispectral/{domain}``, ``data_prefix=dict(
    img_path='img/{split}', seg_map_path='ann/{split}')``; images are
    ``.npy`` (load them with :class:`LoadMultiBandImageFromFile`), labels
    ``.png`` class indices (255 ignored)."""
    METAINFO = dict(classes=CLASSES, palette=PALETTE)

    def __init__(self, img_suffix: str = '.npy',
                 seg_map_suffix: str = '.png',
                 reduce_zero_label: bool = False, **kwargs) -> None:
        super().__init__(img_suffix=img_suffix, seg_map_suffix=seg_map_suffix,
                         reduce_zero_label=reduce_zero_label, **kwargs)


@TRANSFORMS.register_module()
class LoadMultiBandImageFromFile(BaseTransform):
    """Load a multi-band image saved with ``numpy.save`` (``.npy``).

    mmcv's ``LoadImageFromFile`` decodes at most 4 channels; this reads any
    number, any numeric dtype (uint16 DN, float reflectance).

    Args:
        to_float32: cast to float32 (else keep the stored dtype).
        channel_order: ``'hwc'`` (stored H x W x C, the default) or
            ``'chw'`` (stored C x H x W; transposed to H x W x C).
        bands: channels to keep, in order (default all).
        num_bands: expected band count of the file; another count raises
            ``ValueError`` naming both (default: not checked).
        backend_args: mmengine file backend arguments.

    Required keys: ``img_path``. Added keys: ``img`` (H x W x C),
    ``img_shape``, ``ori_shape``.
    """

    def __init__(self, *, to_float32: bool = True, channel_order: str = 'hwc',
                 bands: Optional[Sequence[int]] = None,
                 num_bands: Optional[int] = None,
                 backend_args: Optional[Dict] = None) -> None:
        if channel_order not in ('hwc', 'chw'):
            raise ValueError("channel_order must be 'hwc' or 'chw', got "
                             f'{channel_order!r}')
        self.to_float32 = to_float32
        self.channel_order = channel_order
        self.bands = None if bands is None else [int(b) for b in bands]
        self.num_bands = num_bands
        self.backend_args = backend_args

    def transform(self, results: Dict) -> Dict:
        path = results['img_path']
        try:
            img = np.load(io.BytesIO(
                fileio.get(path, backend_args=self.backend_args)),
                allow_pickle=False)
        except ValueError as err:
            raise ValueError(f'{path} is not a .npy array: {err}') from err
        if img.ndim == 2:
            img = img[..., None] if self.channel_order == 'hwc' else img[None]
        if img.ndim != 3:
            raise ValueError(f'{path}: expected a 3-D image, got shape '
                             f'{img.shape}')
        if self.channel_order == 'chw':
            img = img.transpose(1, 2, 0)
        if self.num_bands is not None and img.shape[2] != self.num_bands:
            raise ValueError(f'{path} has {img.shape[2]} bands, the pipeline '
                             f'expects {self.num_bands} (num_bands)')
        if self.bands is not None:
            bad = [b for b in self.bands if not 0 <= b < img.shape[2]]
            if bad:
                raise ValueError(f'{path} has {img.shape[2]} bands; bands '
                                 f'{bad} do not exist')
            img = img[..., self.bands]
        if self.to_float32:
            img = img.astype(np.float32)
        img = np.ascontiguousarray(img)
        results['img'] = img
        results['img_shape'] = img.shape[:2]
        results['ori_shape'] = img.shape[:2]
        return results

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(to_float32={self.to_float32}, '
                f'channel_order={self.channel_order!r}, bands={self.bands}, '
                f'num_bands={self.num_bands})')
