"""tools/analysis_tools/gres_reference_scores.py on a small generalized
synthetic set: each reference predictor's scores against values worked
out here from the refs and masks themselves."""
import importlib.util
import json
import os.path as osp

import numpy as np
import pytest
from pycocotools.coco import COCO

from mmseg_sera.datasets.synthetic_gres import generate_grefer_set
from ..conftest import REPO


def _tool():
    path = osp.join(REPO, 'tools', 'analysis_tools',
                    'gres_reference_scores.py')
    spec = importlib.util.spec_from_file_location('_tool_gres_ref', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reference_scores(tmp_path):
    root = str(tmp_path / 'set')
    generate_grefer_set(root, num_images=10, img_size=112, seed=5,
                        progress=False)
    out_json = str(tmp_path / 'scores.json')
    scores = _tool().main([root, '--split', 'train', '--json', out_json])
    with open(out_json) as f:
        assert json.load(f) == scores

    coco = COCO(osp.join(root, 'grefcoco', 'instances.json'))
    with open(osp.join(root, 'grefcoco', 'grefs(unc).json')) as f:
        refs = [r for r in json.load(f) if r['split'] == 'train']
    ious, empty = [], []
    for ref in refs:
        every = np.zeros((112, 112), np.uint8)
        for a in coco.getAnnIds(imgIds=[ref['image_id']]):
            every |= coco.annToMask(coco.anns[a])
        for _ in ref['sentences']:
            if ref['ann_id'] == [-1]:
                empty.append(True)
                ious.append(0.0)
            else:
                empty.append(False)
                target = sum(int(coco.annToMask(coco.anns[a]).sum())
                             for a in ref['ann_id'])
                ious.append(target / int(every.sum()))
    share = 100 * np.mean(empty)
    assert 0 < share < 100

    nothing = scores['always-empty']
    assert nothing['gIoU'] == pytest.approx(share)
    assert (nothing['cIoU'], nothing['N-acc'], nothing['T-acc']) == (
        0.0, 100.0, 0.0)
    oracle = scores['oracle-no-nt']
    assert oracle['gIoU'] == pytest.approx(100 - share)
    assert (oracle['N-acc'], oracle['T-acc']) == (0.0, 100.0)
    kinds = {k[len('gIoU_'):] for k in oracle if k.startswith('gIoU_')}
    assert 'no_target' in kinds and 'multi' in kinds
    for kind in kinds - {'no_target'}:
        assert oracle[f'gIoU_{kind}'] == 100.0
    assert oracle['gIoU_no_target'] == 0.0
    every = scores['all-objects']
    assert every['gIoU'] == pytest.approx(100 * np.mean(ious))
    assert every['N-acc'] == 0.0 and every['T-acc'] == 100.0
