"""tools/analysis_tools/visualize_routing.py on a tiny random-weight
checkpoint written by the test."""
import importlib.util
import json
import os
import os.path as osp

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from PIL import Image

from mmseg.registry import MODELS
from mmseg_sera.apis import inference_model, init_model
from mmseg_sera.datasets import RefCocoDataset
from mmseg_sera.engine import RoutingRecorder
from ..conftest import REPO, TINY_CONFIG


def _load_tool():
    path = osp.join(REPO, 'tools/analysis_tools/visualize_routing.py')
    spec = importlib.util.spec_from_file_location('visualize_routing', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def vr():
    return _load_tool()


@pytest.fixture(scope='module')
def tiny(synthetic_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp('routing')
    cfg = Config.fromfile(TINY_CONFIG)
    for split in ('train', 'val', 'test'):
        cfg[f'{split}_dataloader'].dataset.data_root = synthetic_root
    cfg_path = str(tmp / 'tiny.py')
    cfg.dump(cfg_path)
    init_default_scope('mmseg')
    torch.manual_seed(0)
    ckpt = str(tmp / 'tiny.pth')
    torch.save({'state_dict': MODELS.build(cfg.model).state_dict()}, ckpt)
    return dict(cfg=cfg_path, ckpt=ckpt, root=synthetic_root)


def _png(path: str) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == 'PNG'
        return np.asarray(im.convert('RGB'))


def test_dataset_samples_give_pngs_and_exact_numbers(vr, tiny, tmp_path):
    out = str(tmp_path / 'routing')
    vr.main([tiny['cfg'], tiny['ckpt'], '--out-dir', out, '--split', 'val',
             '--indices', '0', '2'])
    files = sorted(os.listdir(out))
    assert files[-3:] == ['routing.json', 'routing_stats.json', 'summary.png']
    samples = [f for f in files if f.endswith('.png') and f[0].isdigit()]
    assert len(samples) == 2
    for f in samples + ['summary.png']:
        pixels = _png(osp.join(out, f))
        assert pixels.shape[0] > 100 and pixels.shape[1] > 300
        assert pixels.std() > 10  # a drawn figure, not a blank canvas
    with open(osp.join(out, 'routing.json')) as f:
        dump = json.load(f)

    # the numbers equal a direct run of the model on the same items
    ds = RefCocoDataset(data_root=tiny['root'], dataset='refcoco',
                        split_by='unc', split='val', test_mode=True,
                        sentence_sampling='all', pipeline=[])
    model = init_model(tiny['cfg'], tiny['ckpt'], device='cpu')
    for entry, idx in zip(dump, (0, 2)):
        info = ds.get_data_info(idx)
        assert entry['img'] == info['img_path']
        assert entry['text'] == info['sentences'][0]
        assert sorted(entry['routing']) == [
            'backbone.adapters.1', 'backbone.adapters.3', 'neck'
        ]
        with RoutingRecorder(model) as rec:
            inference_model(model, info['img_path'], [info['sentences'][0]])
        for r in rec.records:
            got = entry['routing'][r.module]
            assert got['experts'] == list(r.experts)
            np.testing.assert_allclose(got['weights'], r.weights[0].numpy(),
                                       rtol=1e-6)
        assert sum(entry['routing']['neck']['weights']) == pytest.approx(1)


def test_own_image_and_token_routing(vr, tiny, tmp_path):
    img_dir = osp.join(tiny['root'], 'images/mscoco/images/train2014')
    img = osp.join(img_dir, sorted(os.listdir(img_dir))[0])
    cfg = Config.fromfile(tiny['cfg'])
    cfg.model.neck.routing = 'token'
    cfg_path = str(tmp_path / 'token.py')
    cfg.dump(cfg_path)
    out = str(tmp_path / 'own')
    vr.main([cfg_path, tiny['ckpt'], '--out-dir', out, '--img', img,
             '--texts', 'the red circle', 'the leftmost shape'])
    with open(osp.join(out, 'routing.json')) as f:
        dump = json.load(f)
    assert [d['text'] for d in dump] == ['the red circle',
                                         'the leftmost shape']
    neck = np.asarray(dump[0]['routing']['neck']['weights'])
    assert neck.shape == (64, 4)  # 8 x 8 tokens at 112 px
    np.testing.assert_allclose(neck.sum(1), 1.0, rtol=1e-5)
    # one map per fusion expert: a wider figure than per-sample routing
    wide = _png(osp.join(out, sorted(os.listdir(out))[0]))
    assert wide.shape[1] >= 6 * 300


def test_token_map_follows_the_letterbox(vr):
    # 8 x 8 grid over a 112 x 112 input whose rows 28..83 are the image
    weights = np.repeat(np.arange(8, dtype=np.float32), 8) / 7
    meta = dict(pad_shape=(112, 112), padding_size=(0, 0, 28, 28),
                ori_shape=(56, 112))
    wmap = vr.token_map_on_image(weights, meta)
    assert wmap.shape == (56, 112)
    # only grid rows 2..5 lie on the image: top ~2/7, bottom ~5/7
    assert 1.5 / 7 < wmap[0].mean() < 2.5 / 7
    assert 4.5 / 7 < wmap[-1].mean() < 5.5 / 7
    assert np.all(np.diff(wmap[:, 50]) >= -1e-6)  # increasing downwards


def test_bad_arguments(vr, tiny, tmp_path):
    with pytest.raises(SystemExit, match='--img and --texts'):
        vr.main([tiny['cfg'], tiny['ckpt'], '--img', 'x.png'])
    with pytest.raises(IndexError, match='out of range'):
        vr.main([tiny['cfg'], tiny['ckpt'], '--out-dir', str(tmp_path),
                 '--indices', '100000'])


def test_stats_only_routes_every_sentence(vr, tiny, tmp_path, capsys):
    out = str(tmp_path / 'stats')
    vr.main([tiny['cfg'], tiny['ckpt'], '--out-dir', out, '--split', 'val',
             '--indices', '0', '1', '--all-sentences', '--stats-only'])
    assert os.listdir(out) == ['routing_stats.json']
    with open(osp.join(out, 'routing_stats.json')) as f:
        stats = json.load(f)
    ds = RefCocoDataset(data_root=tiny['root'], dataset='refcoco',
                        split_by='unc', split='val', test_mode=True,
                        sentence_sampling='all', pipeline=[])
    infos = [ds.get_data_info(i) for i in (0, 1)]
    kinds = [k for info in infos for k in info['sentence_kinds']]
    model = init_model(tiny['cfg'], tiny['ckpt'], device='cpu')
    weights = []
    with RoutingRecorder(model, modules=['backbone.adapters.1']) as rec:
        for info in infos:
            rec.clear()
            inference_model(model, info['img_path'], info['sentences'])
            weights.append(rec.records[0].weights)
    weights = torch.cat(weights)
    adapter = stats['backbone.adapters.1']
    assert adapter['experts'] == ['spatial', 'boundary']
    np.testing.assert_allclose(adapter['mean'], weights.mean(0), rtol=1e-5)
    assert {k: v['n'] for k, v in adapter['by_group'].items()} == {
        k: kinds.count(k) for k in set(kinds)}
    assert sorted(stats) == ['backbone.adapters.1', 'backbone.adapters.3',
                             'neck']
    assert 'adapter1: sentence share of the spread' in capsys.readouterr().out


def test_run_keeps_the_order_of_the_pairs(vr, tiny):
    """Sentences are batched per image, but the results (and with them
    the kinds that statistics() pairs with them) keep the input order."""
    img_dir = osp.join(tiny['root'], 'images/mscoco/images/train2014')
    a, b = (osp.join(img_dir, f) for f in sorted(os.listdir(img_dir))[:2])
    pairs = [(a, 'the red circle'), (b, 'the blue square'),
             (a, 'the leftmost shape')]
    model = init_model(tiny['cfg'], tiny['ckpt'], device='cpu')
    results = vr.run(model, pairs)
    assert [(r['img'], r['text']) for r in results] == pairs
