"""tools/analysis_tools/compare_methods.py: the table over seeds, and the
commands it runs for one (config, seed)."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    'compare_methods', ROOT / 'tools' / 'analysis_tools' /
    'compare_methods.py')
cm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cm)


def test_summary_gives_mean_and_range_over_seeds():
    results = {
        ('a/x.py', 0): {'testA': {'mIoU': 70.0, 'mIoU_position': 60.0}},
        ('a/x.py', 1): {'testA': {'mIoU': 76.0, 'mIoU_position': 50.0}},
    }
    head, rule, row = cm.summarise(results, ['a/x.py'], [0, 1], ['testA'])
    assert head.startswith('| config | split | seeds | mIoU |')
    cells = [c.strip() for c in row.strip('|').split('|')]
    assert cells[:4] == ['x', 'testA', '2', '73.00 (70.0-76.0)']
    assert cells[3 + cm.KEYS.index('mIoU_position')] == '55.00 (50.0-60.0)'
    assert cells[3 + cm.KEYS.index('oIoU')] == ''  # not reported


def test_one_run_trains_with_seed_and_fixed_threads_then_tests(
        tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, log):
        calls.append(cmd)
        if 'tools/train.py' in cmd:
            work = cmd[cmd.index('--work-dir') + 1]
            (Path(work) / 'last_checkpoint').write_text(f'{work}/e.pth')
        else:
            out = Path(cmd[cmd.index('--out') + 1])
            out.mkdir(parents=True)
            (out / 'metrics.json').write_text('{"mIoU": 50.0}')

    monkeypatch.setattr(cm, '_run', fake_run)
    args = cm.argparse.Namespace(work_dir=str(tmp_path), threads=1,
                                 workers=0, cfg_options=None, reuse=True,
                                 splits=['testA', 'testB'])
    out = cm.run_one(args, 'configs/x/cfg_a.py', 3)
    assert out == {'testA': {'mIoU': 50.0}, 'testB': {'mIoU': 50.0}}
    train, test_a, test_b = calls
    assert 'randomness.seed=3' in train and 'env_cfg.cpu_threads=1' in train
    assert 'env_cfg.cpu_workers=0' in train
    assert str(tmp_path / 'cfg_a' / 'seed3') in train
    assert 'test_dataloader.dataset.split=testB' in test_b
    assert test_a[test_a.index('tools/test.py') + 2].endswith('e.pth')
    # --reuse: nothing runs again
    calls.clear()
    assert cm.run_one(args, 'configs/x/cfg_a.py', 3) == out
    assert calls == []


def test_missing_config_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as err:
        cm.main(['configs/no_such.py'])
    assert err.value.code == 2
    assert 'config not found: configs/no_such.py' in capsys.readouterr().err
