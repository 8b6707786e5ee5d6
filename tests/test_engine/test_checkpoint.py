"""Atomic checkpoint writes and the resume that skips damaged files."""
import logging
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch
from mmengine.fileio import get_file_backend
from mmengine.logging import MMLogger

from mmseg_sera.engine import (AtomicLocalBackend, CheckpointError,
                               find_resume_checkpoint, read_checkpoint,
                               use_atomic_checkpoints)
from mmseg_sera.engine.checkpoint import resume_candidates


def _save(path, epoch: int) -> dict:
    ckpt = dict(meta=dict(epoch=epoch, iter=3 * epoch),
                state_dict={'w': torch.full((4, ), float(epoch))},
                optimizer={})
    torch.save(ckpt, str(path))
    return ckpt


def _truncate(path) -> None:
    size = osp.getsize(path)
    with open(path, 'r+b') as f:
        f.truncate(size // 2)


def _point(work_dir, path) -> None:
    with open(osp.join(work_dir, 'last_checkpoint'), 'w') as f:
        f.write(str(path))


@pytest.fixture
def warnings_logged():
    """Messages of the WARNING records the current MMLogger emits."""
    logger = MMLogger.get_current_instance()
    records = []

    class Keep(logging.Handler):

        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep(level=logging.WARNING)
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def test_backend_is_selected_by_name_and_writes_whole_files(tmp_path):
    backend = get_file_backend(backend_args=dict(backend='local_atomic'))
    assert isinstance(backend, AtomicLocalBackend)
    target = tmp_path / 'sub' / 'epoch_1.pth'
    backend.put(b'abc' * 1000, str(target))
    assert target.read_bytes() == b'abc' * 1000
    backend.put_text('epoch_1.pth', str(tmp_path / 'pointer'))
    assert (tmp_path / 'pointer').read_text() == 'epoch_1.pth'
    assert sorted(os.listdir(tmp_path / 'sub')) == ['epoch_1.pth']


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / 'epoch_1.pth'
    target.write_bytes(b'old and complete')

    def full_disk(fd):
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(os, 'fsync', full_disk)
    with pytest.raises(OSError, match='No space'):
        AtomicLocalBackend().put(b'new', str(target))
    assert target.read_bytes() == b'old and complete'
    assert os.listdir(tmp_path) == ['epoch_1.pth']  # no .partial left


def test_use_atomic_checkpoints_respects_explicit_choices():
    cfg = dict(default_hooks=dict(checkpoint=dict(type='CheckpointHook')))
    use_atomic_checkpoints(cfg)
    assert cfg['default_hooks']['checkpoint']['backend_args'] == dict(
        backend='local_atomic')
    own = dict(backend='local')
    for hook in (dict(type='CheckpointHook', backend_args=own),
                 dict(type='CheckpointHook', out_dir='s3://bucket/run')):
        cfg = dict(default_hooks=dict(checkpoint=hook))
        use_atomic_checkpoints(cfg)
        assert hook.get('backend_args') in (own, None)
    use_atomic_checkpoints(dict())  # no hooks at all: nothing to do


@pytest.mark.parametrize('content,reason', [
    (None, 'failed finding central directory'),  # truncated zip
    (b'not a checkpoint at all', 'cannot read checkpoint'),
])
def test_read_checkpoint_names_a_damaged_file_in_one_line(
        tmp_path, content, reason):
    path = tmp_path / 'epoch_3.pth'
    _save(path, 3)
    if content is None:
        _truncate(path)
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(str(path))
    message = str(info.value)
    assert str(path) in message and reason in message
    assert '\n' not in message


def test_read_checkpoint_refuses_non_dicts_and_code(tmp_path):
    listed = tmp_path / 'list.pth'
    torch.save([1, 2], str(listed))
    with pytest.raises(CheckpointError, match='holds a list'):
        read_checkpoint(str(listed))
    evil = tmp_path / 'evil.pth'
    torch.save({'x': os.system}, str(evil))  # a global, never called
    with pytest.raises(CheckpointError, match=str(evil)):
        read_checkpoint(str(evil))
    with pytest.raises(CheckpointError, match='not found'):
        read_checkpoint(str(tmp_path / 'missing.pth'))


def test_candidates_newest_first(tmp_path):
    for epoch in (1, 2, 10):
        _save(tmp_path / f'epoch_{epoch}.pth', epoch)
    _save(tmp_path / 'best_mIoU_epoch_10.pth', 10)
    (tmp_path / 'notes.txt').write_text('x')
    _point(tmp_path, tmp_path / 'epoch_2.pth')
    names = [osp.basename(p) for p in resume_candidates(str(tmp_path))]
    # the pointer first, then by number (10 before 2), best_* never
    assert names == ['epoch_2.pth', 'epoch_10.pth', 'epoch_1.pth']


def test_resume_skips_a_truncated_newest_checkpoint(tmp_path,
                                                    warnings_logged):
    _save(tmp_path / 'epoch_1.pth', 1)
    _save(tmp_path / 'epoch_2.pth', 2)
    _truncate(tmp_path / 'epoch_2.pth')
    _point(tmp_path, tmp_path / 'epoch_2.pth')
    (tmp_path / 'epoch_3.pth.partial').write_bytes(b'half')
    chosen = find_resume_checkpoint(str(tmp_path))
    assert chosen == str(tmp_path / 'epoch_1.pth')
    text = '\n'.join(warnings_logged)
    assert str(tmp_path / 'epoch_2.pth') in text
    assert 'failed finding central directory' in text
    assert 'resuming from ' + str(tmp_path / 'epoch_1.pth') in text
    assert not (tmp_path / 'epoch_3.pth.partial').exists()


@pytest.mark.parametrize('pointer', ['', 'garbage-half-writ'])
def test_resume_without_a_usable_pointer_scans_the_folder(tmp_path,
                                                          pointer):
    _save(tmp_path / 'iter_4.pth', 1)
    _save(tmp_path / 'iter_8.pth', 2)
    (tmp_path / 'last_checkpoint').write_text(pointer)
    assert find_resume_checkpoint(str(tmp_path)) == str(tmp_path /
                                                        'iter_8.pth')


def test_resume_with_nothing_readable_lists_what_it_tried(tmp_path):
    assert find_resume_checkpoint(str(tmp_path)) is None  # fresh start
    for epoch in (1, 2):
        _save(tmp_path / f'epoch_{epoch}.pth', epoch)
        _truncate(tmp_path / f'epoch_{epoch}.pth')
    torch.save({'state_dict': {}}, str(tmp_path / 'epoch_3.pth'))
    with pytest.raises(CheckpointError) as info:
        find_resume_checkpoint(str(tmp_path))
    message = str(info.value)
    assert 'no readable checkpoint' in message
    for epoch in (1, 2, 3):
        assert str(tmp_path / f'epoch_{epoch}.pth') in message
    assert 'not a training checkpoint' in message


@pytest.mark.parametrize('tool', ['dinov2_to_sera', 'dinov3_to_sera',
                                  'spectralmoe_to_sera', 'detris_to_sera'])
def test_converters_name_a_truncated_file(tool, tmp_path):
    src = tmp_path / 'cut.pth'
    _save(src, 1)
    _truncate(src)
    root = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
    proc = subprocess.run(
        [sys.executable, f'tools/model_converters/{tool}.py', str(src),
         str(tmp_path / 'out.pth')], cwd=root, capture_output=True,
        text=True, timeout=300)
    assert proc.returncode == 2
    assert f'error: cannot read checkpoint {src}: ' in proc.stderr
    assert not (tmp_path / 'out.pth').exists()
