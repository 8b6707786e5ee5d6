"""Checkpoints that survive a killed run, and a resume that skips a damaged
one.

MMEngine writes a checkpoint by opening the final file name and writing into
it (``LocalBackend.put``), then points ``last_checkpoint`` at it. A run killed
or out of disk during that write leaves a truncated ``epoch_N.pth`` under the
real name, and ``--resume`` then dies inside ``torch.load`` without naming the
file. Two small pieces fix that without forking MMEngine:

* :class:`AtomicLocalBackend` (file backend ``'local_atomic'``): writes to
  ``<name>.partial`` in the same folder, flushes and ``fsync``\\ s it, then
  renames it over ``<name>`` (``os.replace``, atomic on POSIX). A reader sees
  the old file or the complete new one, never half of one. The checkpoint
  hook selects it with ``backend_args=dict(backend='local_atomic')``; our
  schedules set that, and :func:`use_atomic_checkpoints` adds it to any config
  run through ``tools/train.py`` whose checkpoint hook writes locally and
  names no backend. ``CheckpointHook`` writes ``last_checkpoint`` only after
  the checkpoint is in place, so the pointer never names a partial file.
* :func:`find_resume_checkpoint`: what ``--resume`` resumes from. It tries
  the file ``last_checkpoint`` names, then every ``epoch_<n>.pth`` /
  ``iter_<n>.pth`` of the folder from the highest ``n`` down, and takes the
  first one that loads; each one it skips is logged with the reason.
  ``best_*`` checkpoints hold no optimizer state and are never resumed from.
"""
import logging
import os
import os.path as osp
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from mmengine.fileio import LocalBackend, register_backend
from mmengine.logging import print_log

PARTIAL_SUFFIX = '.partial'
ATOMIC_BACKEND = 'local_atomic'
_NUMBERED = re.compile(r'^(?:epoch|iter)_(\d+)\.pth$')


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used; the message names it."""


class AtomicLocalBackend(LocalBackend):
    """:class:`mmengine.fileio.LocalBackend` whose writes are all-or-nothing
    (temporary file in the target's folder, ``fsync``, rename)."""

    def put(self, obj: bytes, filepath: Union[str, Path]) -> None:
        filepath = str(filepath)
        folder = osp.dirname(osp.abspath(filepath))
        os.makedirs(folder, exist_ok=True)
        partial = filepath + PARTIAL_SUFFIX
        try:
            with open(partial, 'wb') as f:
                f.write(obj)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, filepath)
        except BaseException:
            if osp.exists(partial):
                os.remove(partial)
            raise
        _fsync_dir(folder)

    def put_text(self, obj: str, filepath: Union[str, Path],
                 encoding: str = 'utf-8') -> None:
        self.put(obj.encode(encoding), filepath)


def _fsync_dir(folder: str) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot
    be opened, as on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


register_backend(ATOMIC_BACKEND, AtomicLocalBackend, force=True)


def use_atomic_checkpoints(cfg) -> None:
    """Give ``cfg``'s checkpoint hook the atomic local backend, unless it
    names a backend of its own or saves to a remote ``out_dir``
    (``s3://...``). ``cfg`` is modified in place."""
    hook = (cfg.get('default_hooks') or {}).get('checkpoint')
    if not hook or hook.get('backend_args') or hook.get('file_client_args'):
        return
    if '://' in str(hook.get('out_dir') or ''):
        return
    hook['backend_args'] = dict(backend=ATOMIC_BACKEND)


def read_checkpoint(path: str, map_location: str = 'cpu',
                    allow: Sequence[type] = ()) -> dict:
    """Load a checkpoint with ``torch.load(weights_only=True)``: tensors,
    plain containers, the types MMEngine writes
    (:func:`~.compat.register_checkpoint_safe_globals`) and ``allow``.

    Raises:
        CheckpointError: the file is missing, truncated, not a checkpoint or
            not a dict; the one-line message names the file and the reason.
    """
    if not osp.isfile(path):
        raise CheckpointError(f'checkpoint not found: {path}')
    try:
        with torch.serialization.safe_globals(list(allow)):
            ckpt = torch.load(path, map_location=map_location,
                              weights_only=True)
    except Exception as exc:  # torch raises several types for a bad file
        raise CheckpointError(
            f'cannot read checkpoint {path}: {_first_line(exc)}') from exc
    if not isinstance(ckpt, dict):
        raise CheckpointError(f'cannot read checkpoint {path}: it holds a '
                              f'{type(ckpt).__name__}, not a dict')
    return ckpt


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= 200 else line[:197] + '...'


def _pointer_and_folders(work_dir: str) -> Tuple[str, List[str]]:
    """The path ``last_checkpoint`` names ('' without one) and the folders
    that may hold checkpoints: that path's folder and the work dir."""
    pointer = osp.join(work_dir, 'last_checkpoint')
    named = ''
    if osp.isfile(pointer):
        with open(pointer, errors='replace') as f:
            named = f.read().strip()
    folders = [osp.dirname(named)] if named else []
    folders.append(work_dir)
    return named, [f for f in dict.fromkeys(folders) if osp.isdir(f)]


def resume_candidates(work_dir: str) -> List[str]:
    """Checkpoints ``--resume`` may use, newest first: the one
    ``last_checkpoint`` names, then the numbered ones of its folder and of
    the work dir by decreasing number."""
    named, folders = _pointer_and_folders(work_dir)
    numbered: Dict[str, int] = {}
    for folder in folders:
        for name in os.listdir(folder):
            match = _NUMBERED.match(name)
            if match:
                path = osp.join(folder, name)
                numbered.setdefault(osp.normpath(path), int(match.group(1)))
    ordered = sorted(numbered, key=lambda p: (-numbered[p], p))
    if named:
        named = osp.normpath(named)
        ordered = [named] + [p for p in ordered if p != named]
    return ordered


def find_resume_checkpoint(work_dir: str,
                           logger: str = 'current') -> Optional[str]:
    """The newest checkpoint of ``work_dir`` that loads, or None when the
    folder holds none (a fresh start, as MMEngine's own auto-resume).

    A candidate that does not load (see :func:`resume_candidates`) is logged
    as a warning with its reason and the next one is tried; leftover
    ``*.partial`` files of an interrupted write are removed.

    Raises:
        CheckpointError: there were checkpoints, and none of them loads; the
            message lists every file tried and why it failed.
    """
    _remove_partials(work_dir, logger)
    failures: List[Tuple[str, str]] = []
    for path in resume_candidates(work_dir):
        try:
            ckpt = read_checkpoint(path)
        except CheckpointError as exc:
            failures.append((path, str(exc)))
            print_log(f'--resume: skipping {path}: {exc}', logger=logger,
                      level=logging.WARNING)
            continue
        missing = [k for k in ('state_dict', 'meta') if k not in ckpt]
        if missing:
            reason = f'{path} lacks {missing}: not a training checkpoint'
            failures.append((path, reason))
            print_log(f'--resume: skipping {path}: {reason}', logger=logger,
                      level=logging.WARNING)
            continue
        if failures:
            print_log(f'--resume: resuming from {path}, the newest readable '
                      'checkpoint', logger=logger, level=logging.WARNING)
        return path
    if failures:
        tried = '\n'.join(f'  {p}: {why}' for p, why in failures)
        raise CheckpointError(
            f'--resume: no readable checkpoint in {work_dir}; tried:\n{tried}')
    return None


def _remove_partials(work_dir: str, logger: str) -> None:
    for folder in _pointer_and_folders(work_dir)[1]:
        for name in os.listdir(folder):
            if name.endswith(PARTIAL_SUFFIX):
                try:  # every rank of a distributed run gets here
                    os.remove(osp.join(folder, name))
                except FileNotFoundError:
                    continue
                print_log(f'removed {osp.join(folder, name)}, left by an '
                          'interrupted checkpoint write', logger=logger,
                          level=logging.WARNING)
