"""paca_torchrun (runtime/launch_common.sh) stops a run the one way its workers save from: the
workers get SIGTERM, once, whichever signal reached the launcher and whether it reached the
launcher alone (docker stop, kill PID) or its whole process group (Ctrl-C, kill -- -PGID)."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.conftest import REPO

WORKER = textwrap.dedent("""
    import os, signal, sys, time
    def stop(signum, frame):
        print(f"rank {os.environ['RANK']} got {signal.Signals(signum).name}", flush=True)
        sys.exit(143)
    signal.signal(signal.SIGTERM, stop)
    open(os.path.join(sys.argv[1], f"ready{os.environ['RANK']}"), "w").close()
    time.sleep(120)
    print(f"rank {os.environ['RANK']} was not stopped", flush=True)
""")

LAUNCHER = textwrap.dedent("""
    set -euo pipefail
    source "$1/runtime/launch_common.sh"
    PACA_NPROC=2
    paca_torchrun "" "$2" "$3" || { echo "launcher: stopped by ${PACA_STOPPED_BY:-nothing}"; exit 1; }
    echo "launcher: torchrun returned"
""")


def as_from_a_terminal():
    """The signals' default dispositions in the launcher: a test run under nohup (or by a CI runner that
    ignores SIGHUP) hands an ignored SIGHUP down, and bash cannot trap a signal ignored when it starts."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


@pytest.mark.slow
@pytest.mark.parametrize("sig, whole_group", [(signal.SIGTERM, False), (signal.SIGINT, True), (signal.SIGHUP, False)],
                         ids=["SIGTERM to the launcher", "Ctrl-C to the group", "SIGHUP to the launcher"])
def test_the_workers_get_sigterm_once_whatever_stopped_the_launcher(tmp_path, sig, whole_group):
    (tmp_path / "worker.py").write_text(WORKER)
    launcher = subprocess.Popen(
        ["bash", "-c", LAUNCHER, "launcher", str(REPO), str(tmp_path / "worker.py"), str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, "PYTHON": sys.executable}, preexec_fn=as_from_a_terminal,
    )
    deadline = time.time() + 120
    while not all((tmp_path / f"ready{rank}").exists() for rank in (0, 1)) and launcher.poll() is None:
        assert time.time() < deadline, "the workers did not start"
        time.sleep(0.2)
    if whole_group:
        os.killpg(launcher.pid, sig)
    else:
        launcher.send_signal(sig)
    output, _ = launcher.communicate(timeout=120)
    # (the workers' and torchrun's lines share one pipe, so they may run into each other)
    assert [output.count(f"rank {rank} got SIGTERM") for rank in (0, 1)] == [1, 1], output
    assert "got SIGINT" not in output and "got SIGHUP" not in output and "not stopped" not in output
    # the launcher waited for torchrun and its workers before its last word
    assert output.splitlines()[-1] == f"launcher: stopped by {sig.name}", output
