"""Restricted loading of the refer toolkit's ``refs(*).p`` pickles.

The refs pickles of RefCOCO / RefCOCO+ / G-Ref were written by Python 2
(``cPickle``, protocol 2).  They hold nothing but plain data: a list of dicts
of lists, strings and numbers.  A pickle, however, can name any importable
callable and call it while loading, so :func:`pickle.load` on a file from the
internet can run arbitrary code.  :class:`RestrictedUnpickler` only resolves a
short allow-list of harmless built-in types (``set``, ``frozenset`` ... and the
Python 2 spellings ``__builtin__.unicode`` / ``long``); every other global is
refused with :class:`UnsafePickleError` *before* anything is called, so a
malicious file cannot execute code.

Python 2 byte strings (``str``) are decoded as latin-1, which maps every byte
to one code point and therefore never fails.
"""
import codecs
import io
import os
import pickle
from typing import Any, Callable, Dict, Tuple, Union

__all__ = ['UnsafePickleError', 'RestrictedUnpickler', 'safe_load_pickle',
           'safe_loads_pickle']


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for a global that is not on the allow-list."""


def _latin1_encode(obj: str, encoding: str = 'latin1') -> bytes:
    """Stand-in for ``_codecs.encode``: Python 3 writes ``bytes`` into a
    protocol-2 pickle as ``_codecs.encode(text, 'latin1')``.  Only that codec
    is accepted."""
    if not isinstance(obj, str) or codecs.lookup(encoding).name != 'iso8859-1':
        raise UnsafePickleError(
            '_codecs.encode is only allowed with a str and the latin-1 codec, '
            f'got {type(obj).__name__} and {encoding!r}')
    return obj.encode('latin1')


# (module, name) -> object.  Python 2 pickles name the builtins module
# ``__builtin__``; Python 3 ones ``builtins``.  Only inert value types.
_PLAIN_TYPES: Dict[str, Any] = {
    'set': set, 'frozenset': frozenset, 'list': list, 'dict': dict,
    'tuple': tuple, 'str': str, 'unicode': str, 'bytes': bytes,
    'bytearray': bytearray, 'int': int, 'long': int, 'float': float,
    'bool': bool, 'complex': complex,
}
SAFE_GLOBALS: Dict[Tuple[str, str], Any] = {}
for _module in ('__builtin__', 'builtins'):
    for _name, _obj in _PLAIN_TYPES.items():
        SAFE_GLOBALS[(_module, _name)] = _obj
SAFE_GLOBALS[('_codecs', 'encode')] = _latin1_encode
del _module, _name, _obj


class RestrictedUnpickler(pickle.Unpickler):
    """A :class:`pickle.Unpickler` that resolves only :data:`SAFE_GLOBALS`.

    Args:
        file: binary file object to read from.
        source (str): name used in error messages (usually the file path).
        encoding (str): how Python 2 ``str`` objects are decoded.
            Default: ``'latin1'``.
    """

    def __init__(self, file: io.BufferedIOBase, *, source: str = '<bytes>',
                 encoding: str = 'latin1') -> None:
        super().__init__(file, encoding=encoding, fix_imports=False)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        obj = SAFE_GLOBALS.get((module, name))
        if obj is None:
            raise UnsafePickleError(
                f'refused to load {self.source}: it references the global '
                f'{module}.{name}, which is not a plain container or scalar '
                f'type; refs pickles must hold only dicts, lists, strings and '
                f'numbers (nothing was executed)')
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(
            f'refused to load {self.source}: persistent id {pid!r} is not '
            'supported')


PathOrFile = Union[str, os.PathLike, io.BufferedIOBase]


def safe_load_pickle(file: PathOrFile, *, encoding: str = 'latin1') -> Any:
    """Load a pickle of plain data (Python 2 or 3, any protocol).

    Args:
        file: a path or a binary file object.
        encoding (str): decoding of Python 2 ``str``. Default: ``'latin1'``.

    Returns:
        The unpickled object (dicts, lists, str, int, float, ...).

    Raises:
        FileNotFoundError: ``file`` is a path that does not exist.
        UnsafePickleError: the pickle references a non-allow-listed global.
    """
    if isinstance(file, (str, os.PathLike)):
        path = os.fspath(file)
        if not os.path.isfile(path):
            raise FileNotFoundError(f'pickle file not found: {path}')
        with open(path, 'rb') as f:
            return RestrictedUnpickler(
                f, source=path, encoding=encoding).load()
    source = getattr(file, 'name', '<file object>')
    return RestrictedUnpickler(
        file, source=str(source), encoding=encoding).load()


def safe_loads_pickle(data: bytes, *, encoding: str = 'latin1',
                      source: str = '<bytes>') -> Any:
    """Like :func:`safe_load_pickle` for an in-memory byte string."""
    return RestrictedUnpickler(
        io.BytesIO(data), source=source, encoding=encoding).load()


def allowed_globals() -> Dict[Tuple[str, str], Callable]:
    """A copy of the allow-list, for documentation and tests."""
    return dict(SAFE_GLOBALS)
