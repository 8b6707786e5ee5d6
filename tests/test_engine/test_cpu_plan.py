"""Threads and dataloader workers chosen from the machine (CPU runs)."""
import pytest
import torch
from mmengine.config import Config

from mmseg_sera.engine import cpu_plan
from mmseg_sera.engine.cpu_plan import apply_cpu_plan, plan_cpu_resources


@pytest.mark.parametrize('cores, busy, world, conf, threads, workers', [
    (2, 0.1, 1, 2, 2, 1),    # quiet 2-core machine: 2 threads, 1 worker
    (2, 1.9, 1, 2, 1, 0),    # another job on both cores: 1 thread, no worker
    (2, 1.0, 1, 2, 1, 0),    # one core busy
    (16, 0.0, 1, 4, 16, 4),  # never more workers than configured
    (16, 3.6, 1, 8, 12, 8),  # round(16 - 3.6) = 12 free
    (16, 0.0, 4, 4, 4, 3),   # 4 ranks share 16 cores
    (2, 0.0, 4, 2, 1, 0),    # more ranks than cores: 1 thread each
    (2, 5.0, 1, 2, 1, 0),    # overloaded: still 1 thread
])
def test_rule(cores, busy, world, conf, threads, workers):
    plan = plan_cpu_resources(cores, busy, world, conf)
    assert (plan.threads, plan.max_workers) == (threads, workers)


def test_explicit_choices_win():
    plan = plan_cpu_resources(2, 1.9, 1, 4, threads=3, workers=2)
    assert (plan.threads, plan.max_workers) == (3, 2)
    # the cap never raises a loader above its configured count
    assert plan_cpu_resources(8, 0, 1, 1, workers=6).max_workers == 1


def _cfg(**env):
    return Config(dict(
        env_cfg=dict(**env),
        train_dataloader=dict(num_workers=2, persistent_workers=True),
        val_dataloader=dict(num_workers=1, persistent_workers=True),
        test_dataloader=dict(num_workers=0, persistent_workers=False)))


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_apply_sets_threads_and_workers(monkeypatch, restore_threads):
    monkeypatch.setattr(cpu_plan, 'available_cores', lambda: 2)
    monkeypatch.setattr(cpu_plan, 'busy_cores', lambda seconds: 1.8)
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    monkeypatch.delenv('LOCAL_WORLD_SIZE', raising=False)
    if torch.cuda.is_available():
        pytest.skip('the plan only applies without CUDA')
    cfg = _cfg()
    plan = apply_cpu_plan(cfg)
    assert (plan.threads, plan.max_workers, plan.busy) == (1, 0, 1.8)
    assert torch.get_num_threads() == 1
    for key in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        assert cfg[key].num_workers == 0
        assert cfg[key].persistent_workers is False

    # quiet machine: 2 threads, loaders capped at 1 worker
    monkeypatch.setattr(cpu_plan, 'busy_cores', lambda seconds: 0.0)
    cfg = _cfg()
    apply_cpu_plan(cfg)
    assert torch.get_num_threads() == 2
    assert cfg.train_dataloader.num_workers == 1
    assert cfg.train_dataloader.persistent_workers is True
    assert cfg.val_dataloader.num_workers == 1


def test_apply_overrides_and_opt_out(monkeypatch, restore_threads):
    if torch.cuda.is_available():
        pytest.skip('the plan only applies without CUDA')
    probed = []
    monkeypatch.setattr(cpu_plan, 'busy_cores',
                        lambda seconds: probed.append(seconds) or 0.0)
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    monkeypatch.delenv('LOCAL_WORLD_SIZE', raising=False)
    cfg = _cfg(cpu_threads=1, cpu_workers=2)
    plan = apply_cpu_plan(cfg)
    assert (plan.threads, plan.max_workers) == (1, 2)
    assert cfg.train_dataloader.num_workers == 2
    assert probed == []  # nothing left to measure
    cfg = _cfg(cpu_plan=False)
    assert apply_cpu_plan(cfg) is None
    assert cfg.train_dataloader.num_workers == 2
    # distributed start: the ranks split the cores, no probe
    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.setattr(cpu_plan, 'available_cores', lambda: 2)
    plan = apply_cpu_plan(_cfg())
    assert (plan.threads, plan.max_workers, probed) == (1, 0, [])


def test_busy_cores_sees_a_busy_process():
    import subprocess
    import sys
    idle = cpu_plan.busy_cores(0.3)
    spin = subprocess.Popen(
        [sys.executable, '-c', 'import time\nt = time.time()\n'
         'while time.time() - t < 5: pass'])
    try:
        busy = cpu_plan.busy_cores(1.0)
    finally:
        spin.kill()
    assert 0.0 <= idle <= cpu_plan.os.cpu_count()
    assert busy >= 0.7, (idle, busy)


def test_cpu_times_leave_out_idle_and_niced_time(tmp_path):
    stat = tmp_path / 'stat'
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text('cpu  100 50 20 1000 10 3 2 1 40 5\ncpu0 1 2 3 4\n')
    assert cpu_plan._cpu_times(str(stat)) == (126, 1186)
    stat.write_text('intr 1 2 3\n')
    assert cpu_plan._cpu_times(str(stat)) is None
    assert cpu_plan._cpu_times(str(tmp_path / 'missing')) is None


def test_apply_adds_the_replan_hook_only_when_threads_were_measured(
        monkeypatch, restore_threads):
    if torch.cuda.is_available():
        pytest.skip('the plan only applies without CUDA')
    monkeypatch.setattr(cpu_plan, 'busy_cores', lambda seconds: 0.0)
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    monkeypatch.delenv('LOCAL_WORLD_SIZE', raising=False)
    cfg = _cfg()
    apply_cpu_plan(cfg)
    assert cfg.custom_hooks == [dict(type='CPUPlanHook')]
    apply_cpu_plan(cfg)  # not twice
    assert cfg.custom_hooks == [dict(type='CPUPlanHook')]
    for env in (dict(cpu_threads=2), dict(cpu_replan=False)):
        cfg = _cfg(**env)
        apply_cpu_plan(cfg)
        assert not cfg.get('custom_hooks')
    monkeypatch.setenv('WORLD_SIZE', '2')
    cfg = _cfg()
    apply_cpu_plan(cfg)
    assert not cfg.get('custom_hooks')


def test_replan_hook_follows_the_load_with_patience(
        monkeypatch, restore_threads):
    from mmseg_sera.engine.hooks import cpu_plan_hook
    monkeypatch.setattr(cpu_plan_hook, 'available_cores', lambda: 2)
    torch.set_num_threads(2)
    hook = cpu_plan_hook.CPUPlanHook(interval=1.0, patience=2)
    assert hook.update(None) is None  # unknown load: nothing changes
    assert hook.update(1.2) is None  # first window asking for 1 thread
    assert torch.get_num_threads() == 2
    assert hook.update(0.1) is None  # quiet again: the vote is reset
    assert hook.update(1.2) is None
    assert hook.update(1.9) == 1  # second window in a row: 1 thread
    assert torch.get_num_threads() == 1
    assert hook.update(1.0) is None  # still busy: stays
    assert hook.update(0.2) is None
    assert hook.update(0.3) == 2  # the other job left
    assert torch.get_num_threads() == 2

    # the training loop asks the meter once per interval
    class Meter:
        calls = 0

        def read(self):
            Meter.calls += 1
            return 1.5

    clock = [100.0]
    monkeypatch.setattr(cpu_plan_hook.time, 'monotonic', lambda: clock[0])
    hook = cpu_plan_hook.CPUPlanHook(interval=10.0, patience=1)
    hook._meter, hook._next = Meter(), 110.0
    for t in (101.0, 105.0, 109.9):
        clock[0] = t
        hook.after_train_iter(None, 0)
    assert Meter.calls == 0 and torch.get_num_threads() == 2
    clock[0] = 110.0
    hook.after_train_iter(None, 0)
    assert Meter.calls == 1 and torch.get_num_threads() == 1
    with pytest.raises(ValueError, match='interval'):
        cpu_plan_hook.CPUPlanHook(interval=0)


def test_others_meter_subtracts_this_process_and_its_workers(monkeypatch):
    ncpu = cpu_plan.os.cpu_count()
    # 10 s windows: total ticks grow by 1000 per core
    machine = iter([(0, 0), (1500 * ncpu // 2, 1000 * ncpu),
                    (1500 * ncpu // 2 + 500, 2000 * ncpu)])
    # this process, then a worker (pid 7) that joins in the second window
    own = iter([{1: 0}, {1: 1000}, {1: 1400, 7: 200}])
    monkeypatch.setattr(cpu_plan, '_cpu_times', lambda: next(machine))
    monkeypatch.setattr(cpu_plan, 'own_ticks', lambda: next(own))
    meter = cpu_plan.OthersMeter()
    # busy 0.75 ncpu cores in all, 1 core ours
    assert meter.read() == pytest.approx(max(0.0, 0.75 * ncpu - 1.0))
    # busy 0.05 cores, ours 0.6: never below 0
    assert meter.read() == 0.0


def test_own_ticks_count_a_busy_worker_process():
    import subprocess
    import sys
    me = cpu_plan.os.getpid()
    assert cpu_plan.own_ticks()[me] == cpu_plan._process_ticks(me) > 0
    # the child burns 0.6 s of CPU time (however loaded the machine is),
    # says so, and waits to be killed
    spin = subprocess.Popen(
        [sys.executable, '-c', 'import time\n'
         'while time.process_time() < 0.6: pass\n'
         'print("done", flush=True)\ntime.sleep(60)'],
        stdout=subprocess.PIPE, text=True)
    try:
        assert spin.stdout.readline().strip() == 'done'
        ticks = cpu_plan.own_ticks()
    finally:
        spin.kill()
        spin.wait()
    assert ticks.get(spin.pid, 0) >= 55, ticks  # the child's 0.6 s
