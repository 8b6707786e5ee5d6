"""Export a refer toolkit refs pickle to JSON.

    python tools/data/refs_pickle_to_json.py 'data/refcoco/refs(unc).p'
    # -> data/refcoco/refs(unc).json, which RefCocoDataset reads when the
    #    pickle is absent (or name it with refs_file=...)

The pickle is read with the restricted unpickler (plain containers and
scalars only); a pickle that references anything else is refused.
"""
import argparse
import json
import os.path as osp

from mmseg_sera.datasets.refcoco import load_refs


def export_refs(src: str, dst: str = None) -> str:
    """Write ``src`` (a refs pickle) as JSON to ``dst`` (default: same name
    with ``.json``).  Returns ``dst``."""
    if dst is None:
        dst = osp.splitext(src)[0] + '.json'
    refs = load_refs(src)
    with open(dst, 'w', encoding='utf-8') as f:
        json.dump(refs, f, ensure_ascii=False)
    return dst


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description='refs(*).p -> refs(*).json')
    p.add_argument('src', help="refs pickle, e.g. 'data/refcoco/refs(unc).p'")
    p.add_argument('--out', default=None, help='output JSON file')
    args = p.parse_args(argv)
    dst = export_refs(args.src, args.out)
    print(f'wrote {dst}')
    return dst


if __name__ == '__main__':
    main()
