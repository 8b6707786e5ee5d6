"""torch >= 2.6 weights_only loading and CPU distributed settings."""
import pickle

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.logging.history_buffer import HistoryBuffer

import mmseg_sera  # noqa: F401  (registers the safe globals)
from mmseg_sera.engine import adapt_dist_cfg


def test_mmengine_checkpoint_objects_load_weights_only(tmp_path):
    buf = HistoryBuffer()
    buf.update(1.5)
    buf.update(np.float64(2.5))
    ckpt = dict(meta=dict(message_hub=dict(log_scalars={'loss': buf}),
                          seed=np.int64(3), arr=np.arange(4.0)),
                state_dict={'w': torch.ones(2)})
    path = tmp_path / 'ckpt.pth'
    torch.save(ckpt, path)
    loaded = torch.load(path, weights_only=True)
    hub_buf = loaded['meta']['message_hub']['log_scalars']['loss']
    assert isinstance(hub_buf, HistoryBuffer)
    assert hub_buf.mean() == pytest.approx(2.0)
    assert loaded['meta']['seed'] == 3
    np.testing.assert_array_equal(loaded['meta']['arr'], np.arange(4.0))


class _Evil:

    def __reduce__(self):
        return (print, ('pwned', ))


def test_arbitrary_objects_are_still_refused(tmp_path):
    path = tmp_path / 'evil.pth'
    torch.save({'x': _Evil()}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)


def test_adapt_dist_cfg_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    cfg = Config(dict(env_cfg=dict(dist_cfg=dict(backend='nccl')),
                      find_unused_parameters=True))
    adapt_dist_cfg(cfg)
    assert cfg.env_cfg.dist_cfg.backend == 'gloo'
    assert cfg.model_wrapper_cfg.device_ids is None
    assert cfg.model_wrapper_cfg.find_unused_parameters is True


def test_adapt_dist_cfg_keeps_cuda_settings(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    cfg = Config(dict(env_cfg=dict(dist_cfg=dict(backend='nccl'))))
    adapt_dist_cfg(cfg)
    assert cfg.env_cfg.dist_cfg.backend == 'nccl'
    assert 'model_wrapper_cfg' not in cfg


class _FetchesAttribute:
    """Pickles as ``getattr(owner, name)``."""

    def __init__(self, owner, name):
        self.owner, self.name = owner, name

    def __reduce__(self):
        return (getattr, (self.owner, self.name))


@pytest.mark.parametrize('owner,name', [(np.ndarray, 'tofile'),
                                        (HistoryBuffer, '__init__'),
                                        (HistoryBuffer, 'max_length')])
def test_getattr_is_limited_to_history_buffer_methods(tmp_path, owner, name):
    path = tmp_path / 'evil_getattr.pth'
    torch.save({'x': _FetchesAttribute(owner, name)}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
