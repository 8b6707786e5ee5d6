"""The generated multispectral set: determinism, layout, the sensor model,
the ``.npy`` loader and the mmseg dataset."""
import filecmp
import glob
import json
import os.path as osp

import numpy as np
import pytest
from mmengine.registry import DefaultScope
from PIL import Image

from mmseg.registry import DATASETS, TRANSFORMS
from mmseg_sera.datasets.multispectral import (
    CLASSES, REFLECTANCE, SensorDomain, class_spectra,
    generate_multispectral_set, make_domains, make_scene, render)


@pytest.fixture(scope='module')
def ms_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp('synthetic_multispectral'))
    generate_multispectral_set(root, num_train=6, num_val=3, img_size=28,
                               num_domains=3, seed=0, progress=False)
    return root


def test_layout_and_meta(ms_root):
    with open(osp.join(ms_root, 'meta.json')) as f:
        meta = json.load(f)
    assert meta['classes'] == list(CLASSES) and meta['num_bands'] == 6
    assert [d['name'] for d in meta['domains']] == ['A', 'B', 'C']
    for d in 'ABC':
        for split, n in (('train', 6), ('val', 3)):
            imgs = sorted(glob.glob(osp.join(ms_root, d, 'img', split,
                                             '*.npy')))
            anns = sorted(glob.glob(osp.join(ms_root, d, 'ann', split,
                                             '*.png')))
            assert len(imgs) == len(anns) == n
            img = np.load(imgs[0])
            assert img.shape == (28, 28, 6) and img.dtype == np.uint16
    # the same scenes and labels in every domain, rendered differently
    for split in ('train', 'val'):
        for name in ('00000', '00002'):
            a = osp.join(ms_root, 'A', 'ann', split, name + '.png')
            for d in 'BC':
                b = osp.join(ms_root, d, 'ann', split, name + '.png')
                assert filecmp.cmp(a, b, shallow=False)
                assert not np.array_equal(
                    np.load(a.replace('ann', 'img').replace('.png', '.npy')),
                    np.load(b.replace('ann', 'img').replace('.png', '.npy')))
    # band statistics of the training images, per domain
    stats = meta['band_stats']['A']
    train = np.stack([np.load(p) for p in sorted(glob.glob(
        osp.join(ms_root, 'A', 'img', 'train', '*.npy')))]).astype(float)
    np.testing.assert_allclose(stats['mean'],
                               train.reshape(-1, 6).mean(0), atol=0.01)
    np.testing.assert_allclose(stats['std'],
                               train.reshape(-1, 6).std(0), atol=0.01)


def test_generation_is_deterministic(ms_root, tmp_path):
    other = str(tmp_path / 'again')
    generate_multispectral_set(other, num_train=6, num_val=3, img_size=28,
                               num_domains=3, seed=0, progress=False)
    for path in glob.glob(osp.join(ms_root, '*', '*', '*', '*')):
        rel = osp.relpath(path, ms_root)
        assert filecmp.cmp(path, osp.join(other, rel), shallow=False), rel
    # another seed, other scenes
    label0, _ = make_scene(0, 'train', 0, 28)
    label1, _ = make_scene(1, 'train', 0, 28)
    assert not np.array_equal(label0, label1)


def test_cli_writes_the_set(tmp_path):
    import importlib.util
    repo = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
    path = osp.join(repo, 'tools', 'data', 'make_synthetic_multispectral.py')
    spec = importlib.util.spec_from_file_location('_make_ms', path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = str(tmp_path / 'cli')
    meta = tool.main(['--out', out, '--num-train', '2', '--num-val', '1',
                      '--img-size', '28', '--bands', '8', '--domains', '2',
                      '--quiet'])
    assert meta['num_bands'] == 8 and meta['splits'] == dict(train=2, val=1)
    assert np.load(osp.join(out, 'B', 'img', 'val',
                            '00000.npy')).shape == (28, 28, 8)


def test_scenes_have_smooth_regions_of_several_classes():
    for i in range(8):
        label, rho = make_scene(0, 'val', i, 56)
        assert label.dtype == np.uint8 and rho.shape == (56, 56, 6)
        assert 2 <= len(np.unique(label)) <= len(CLASSES)
        # regions, not salt and pepper: most 4-neighbours agree
        same = (label[1:] == label[:-1]).mean()
        assert same > 0.85
        # each class keeps its spectral shape: the mean spectrum of its
        # pixels correlates with the class spectrum
        for k in np.unique(label):
            if (label == k).sum() < 30:
                continue
            mean = rho[label == k].mean(0)
            assert np.corrcoef(mean, REFLECTANCE[k])[0, 1] > 0.8, (i, k)


def test_class_spectra_other_band_counts():
    assert np.array_equal(class_spectra(6), REFLECTANCE)
    s = class_spectra(11)
    assert s.shape == (5, 11)
    np.testing.assert_allclose(s[:, ::2], REFLECTANCE)
    with pytest.raises(ValueError):
        class_spectra(1)


def test_sensor_model():
    flat = np.full((4, 4, 3), 0.2)
    ref = SensorDomain('R', gains=(1., 1., 1.), offsets=(0., 0., 0.),
                       noise=0., jitter=0.)
    assert (render(flat, ref, np.random.default_rng(0)) == 2000).all()
    d = SensorDomain('D', gains=(1., 2., 1.), offsets=(0.01, 0., 0.),
                     crosstalk=0.1, illumination=0.5, noise=0., jitter=0.)
    M = d.response_matrix()
    # rows: gain x (c from each neighbour, the rest from the band)
    np.testing.assert_allclose(M, [[0.9, 0.1, 0.], [0.2, 1.6, 0.2],
                                   [0., 0.1, 0.9]])
    rho = np.zeros((1, 1, 3))
    rho[..., 1] = 0.4
    dn = render(rho, d, np.random.default_rng(0))[0, 0]
    # 0.5 * M @ (0, .4, 0) + (.01, 0, 0), in DN
    np.testing.assert_array_equal(dn, [300, 3200, 200])
    with pytest.raises(ValueError, match='4 bands, domain D 3'):
        render(np.zeros((2, 2, 4)), d, np.random.default_rng(0))


def test_domains_shift_values_more_with_their_index():
    doms = make_domains(6, 4, seed=0)
    assert [d.name for d in doms] == ['A', 'B', 'C', 'D']
    assert doms[0].gains == (1., ) * 6 and doms[0].crosstalk == 0
    _, rho = make_scene(0, 'val', 0, 56)
    ref = render(rho, doms[0], np.random.default_rng(0)).astype(float)
    shift = [
        np.abs(render(rho, d, np.random.default_rng(0)) - ref).mean()
        for d in doms[1:]
    ]
    assert shift[0] > 0 and shift[-1] > shift[0]
    assert make_domains(6, 4, seed=0) == doms
    with pytest.raises(ValueError):
        make_domains(6, 0)


# --------------------------------------------------------------------------
# loading and the mmseg dataset
# --------------------------------------------------------------------------
def test_load_multiband_image(tmp_path):
    img = np.arange(5 * 4 * 7, dtype=np.uint16).reshape(5, 4, 7)
    hwc = str(tmp_path / 'hwc.npy')
    chw = str(tmp_path / 'chw.npy')
    np.save(hwc, img)
    np.save(chw, img.transpose(2, 0, 1))
    load = TRANSFORMS.build(dict(type='LoadMultiBandImageFromFile'))
    out = load(dict(img_path=hwc))
    assert out['img'].dtype == np.float32 and out['img_shape'] == (5, 4)
    np.testing.assert_array_equal(out['img'], img)
    out = TRANSFORMS.build(
        dict(type='LoadMultiBandImageFromFile', channel_order='chw',
             to_float32=False, bands=[3, 0]))(dict(img_path=chw))
    assert out['img'].dtype == np.uint16
    np.testing.assert_array_equal(out['img'], img[..., [3, 0]])
    with pytest.raises(ValueError, match='has 7 bands, the pipeline '
                       'expects 6'):
        TRANSFORMS.build(dict(type='LoadMultiBandImageFromFile',
                              num_bands=6))(dict(img_path=hwc))
    with pytest.raises(ValueError, match=r'bands \[9\] do not exist'):
        TRANSFORMS.build(dict(type='LoadMultiBandImageFromFile',
                              bands=[9]))(dict(img_path=hwc))
    bad = tmp_path / 'bad.npy'
    bad.write_bytes(b'not numpy')
    with pytest.raises(ValueError, match='not a .npy array'):
        load(dict(img_path=str(bad)))


def test_dataset_and_pipeline(ms_root):
    pipeline = [
        dict(type='LoadMultiBandImageFromFile', num_bands=6),
        dict(type='LoadAnnotations'),
        dict(type='RandomFlip', prob=0.5,
             direction=['horizontal', 'vertical']),
        dict(type='PackSegInputs'),
    ]
    with DefaultScope.overwrite_default_scope('mmseg'):
        ds = DATASETS.build(
            dict(type='SyntheticMultispectralDataset',
                 data_root=osp.join(ms_root, 'C'),
                 data_prefix=dict(img_path='img/val', seg_map_path='ann/val'),
                 pipeline=pipeline))
        item = ds[1]
    assert len(ds) == 3 and ds.metainfo['classes'] == CLASSES
    assert tuple(item['inputs'].shape) == (6, 28, 28)
    seg = item['data_samples'].gt_sem_seg.data
    assert seg.shape == (1, 28, 28) and int(seg.max()) < len(CLASSES)
    # the label is the stored one (up to the flip)
    stored = np.array(Image.open(osp.join(ms_root, 'C', 'ann', 'val',
                                          '00001.png')))
    flips = [stored, stored[:, ::-1], stored[::-1]]
    assert any(np.array_equal(seg[0].numpy(), f) for f in flips)
