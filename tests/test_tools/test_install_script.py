"""tools/install.sh: quiet steps, progress lines, and on failure the tail of
the log it writes.  Runs the real script against a venv whose ``python`` is a
stand-in that prints pages of warnings and then fails, so nothing is
installed."""
import os
import stat
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

FAKE_PYTHON = """#!/usr/bin/env bash
for i in $(seq 300); do
  echo "WARNING: Location 'file:///x/$i' is ignored"
done
sleep 3
echo "ERROR: No matching distribution found for wheel-xyz" >&2
exit 7
"""


def test_install_failure_shows_step_tail_and_log(tmp_path):
    venv = tmp_path / 'venv'
    (venv / 'bin').mkdir(parents=True)
    fake = venv / 'bin' / 'python'
    fake.write_text(FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, VENV=str(venv), INSTALL_HEARTBEAT='1')
    proc = subprocess.run(['bash', str(REPO / 'tools' / 'install.sh')],
                          cwd=REPO, capture_output=True, text=True,
                          timeout=60, env=env)
    out = proc.stdout
    assert proc.returncode == 7, (out, proc.stderr)
    log = venv / 'install.log'
    # everything the tools printed is in the log ...
    assert log.read_text().count('is ignored') == 300
    assert 'No matching distribution found' in log.read_text()
    # ... the terminal gets the step, progress lines, the failure with the
    # tail of the log (the error, not the 300 warnings) and the log's path
    assert '] build tools' in out
    assert '  ... 0m0' in out
    assert 'FAILED: build tools' in out and 'exit 7' in out
    assert '  | ERROR: No matching distribution found' in out
    assert out.count('is ignored') < 40
    assert f'full log: {log}' in out
    assert not (venv / '.mmseg_sera-installed').exists()
