import json
import os
import pickle
import runpy
import struct
from pathlib import Path

import pytest

from mmseg_sera.datasets import RefCocoDataset, load_refs
from mmseg_sera.datasets.safe_pickle import (UnsafePickleError,
                                             safe_load_pickle,
                                             safe_loads_pickle)

ROOT = Path(__file__).resolve().parents[2]


class _Exec:
    """Loading its pickle runs ``exec(code)``."""

    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


class _System:

    def __reduce__(self):
        return os.system, ('echo pwned',)


def _py2_refs_pickle() -> bytes:
    """A protocol-2 pickle as Python 2's cPickle writes it: byte strings
    (SHORT_BINSTRING, latin-1 here), unicode (BINUNICODE), a long (LONG1), a
    float and a ``__builtin__.set``."""
    def bstr(b: bytes) -> bytes:  # SHORT_BINSTRING
        return b'U' + bytes([len(b)]) + b

    def ustr(s: str) -> bytes:  # BINUNICODE
        raw = s.encode('utf-8')
        return b'X' + struct.pack('<I', len(raw)) + raw

    out = b'\x80\x02'  # PROTO 2
    out += b']q\x00(}q\x01('  # EMPTY_LIST, MARK, EMPTY_DICT, MARK
    out += bstr(b'split') + bstr(b'testA')
    out += bstr(b'ref_id') + b'K\x05'  # BININT1 5
    out += bstr(b'ann_id') + b'\x8a\x05\x00\xe4\x0bT\x02'  # LONG1 10000000000
    out += bstr(b'score') + b'G' + struct.pack('>d', 0.25)  # BINFLOAT
    out += bstr(b'sentences') + b']q\x02}q\x03('
    out += bstr(b'sent') + bstr('caf\xe9 on the left'.encode('latin1'))
    out += bstr(b'raw') + ustr('Caf\u00e9 ON the left')
    out += b'u'  # SETITEMS (sentence dict)
    out += b'a'  # APPEND to sentences
    out += bstr(b'tags') + b'c__builtin__\nset\nq\x04]q\x05('
    out += bstr(b'a') + bstr(b'b') + b'e\x85Rq\x06'  # APPENDS, TUPLE1, REDUCE
    out += b'u'  # SETITEMS (ref dict)
    out += b'e.'  # APPENDS, STOP
    return out


EXPECTED_PY2 = [{
    'split': 'testA', 'ref_id': 5, 'ann_id': 10_000_000_000, 'score': 0.25,
    'sentences': [{'sent': 'caf\xe9 on the left',
                   'raw': 'Caf\u00e9 ON the left'}],
    'tags': {'a', 'b'},
}]


# Python 2's default text protocol 0, as ``pickle.dump(refs, f)`` writes it
PY2_PROTOCOL0 = (b"(lp0\n(dp1\nS'split'\np2\nS'val'\np3\nsS'ref_id'\np4\n"
                 b"I7\nsS'ann_id'\np5\nL10000000000L\nsS'sent'\np6\n"
                 b"Vthe caf\\u00e9 on the left\np7\nsS'iscrowd'\np8\nI00\n"
                 b"sS'area'\np9\nF12.5\nsa.")


def test_python2_protocol0_pickle_loads():
    assert safe_loads_pickle(PY2_PROTOCOL0) == [{
        'split': 'val', 'ref_id': 7, 'ann_id': 10_000_000_000,
        'sent': 'the caf\u00e9 on the left', 'iscrowd': False, 'area': 12.5
    }]


def test_python2_protocol2_pickle_loads(tmp_path):
    data = _py2_refs_pickle()
    assert safe_loads_pickle(data) == EXPECTED_PY2
    path = tmp_path / 'refs(unc).p'
    path.write_bytes(data)
    assert safe_load_pickle(str(path)) == EXPECTED_PY2
    # Python 3's own protocol-2 output (fix_imports: __builtin__ names)
    obj = [dict(a=1, b=[1.5, 'x', None, True], c={1, 2}, d=frozenset([3]),
                e=(1, 2), f=b'\x00\xffbytes', g=2**70)]
    blob = pickle.dumps(obj, protocol=2, fix_imports=True)
    assert b'__builtin__' in blob and b'_codecs' in blob
    assert safe_loads_pickle(blob) == obj


@pytest.mark.parametrize('protocol', [0, 2, 4])
def test_code_running_pickle_is_refused(tmp_path, protocol):
    marker = tmp_path / 'marker'
    payload = pickle.dumps(
        [dict(ref_id=0, split='train'),
         _Exec(f'open({str(marker)!r}, "w").close()')], protocol=protocol)
    path = tmp_path / 'refs(unc).p'
    path.write_bytes(payload)
    with pytest.raises(UnsafePickleError) as err:
        safe_load_pickle(str(path))
    assert str(path) in str(err.value)
    assert 'exec' in str(err.value)
    assert isinstance(err.value, pickle.UnpicklingError)
    assert not marker.exists()
    with pytest.raises(UnsafePickleError, match='system'):
        safe_loads_pickle(pickle.dumps(_System(), protocol=protocol))
    # control: the same bytes do run code through plain pickle
    pickle.loads(payload)
    assert marker.exists()


def test_dataset_refuses_unsafe_refs(tmp_path, make_refer_root):
    paths = make_refer_root(str(tmp_path))
    marker = tmp_path / 'marker'
    refs = paths['refs'] + [_Exec(f'open({str(marker)!r}, "w").close()')]
    with open(paths['refs_path'], 'wb') as f:
        pickle.dump(refs, f, protocol=2)
    with pytest.raises(UnsafePickleError, match=r'refs\(unc\)\.p'):
        RefCocoDataset(data_root=paths['root'], split='val')
    assert not marker.exists()


def test_missing_pickle_named(tmp_path):
    with pytest.raises(FileNotFoundError, match='nothing.p'):
        safe_load_pickle(str(tmp_path / 'nothing.p'))


def test_json_export_round_trip(tmp_path, make_refer_root):
    paths = make_refer_root(str(tmp_path))
    tool = runpy.run_path(str(ROOT / 'tools/data/refs_pickle_to_json.py'))
    dst = tool['main']([paths['refs_path']])
    assert dst == paths['refs_path'][:-2] + '.json'
    with open(dst) as f:
        exported = json.load(f)
    assert exported == paths['refs'] == load_refs(paths['refs_path'])
    assert load_refs(dst) == paths['refs']
    # the dataset falls back to the JSON export when the pickle is gone
    before = RefCocoDataset(data_root=paths['root'], split='val',
                            test_mode=True)
    os.remove(paths['refs_path'])
    after = RefCocoDataset(data_root=paths['root'], split='val',
                           test_mode=True)
    assert [after.get_data_info(i) for i in range(len(after))] == [
        before.get_data_info(i) for i in range(len(before))]
