"""host_drift.py: one model in a loop, window by window."""
import re

import pytest

from classification import host_drift


def test_windows_group_the_batches_by_when_they_ran():
    samples = [(100.0, 0.5, 1.0, 0), (100.6, 0.6, 1.2, 3), (101.1, 0.7, 1.4, 0), (102.9, 0.4, 0.8, 9)]
    assert host_drift.windows(samples, 1.0) == [(0.0, [(0.5, 1.0, 0), (0.6, 1.2, 3)]), (1.0, [(0.7, 1.4, 0)]),
                                                (2.0, [(0.4, 0.8, 9)])]


@pytest.mark.parametrize("malloc", ["kept", "default"])
def test_a_short_run_reports_each_window_and_the_drift(capsys, monkeypatch, malloc):
    kept = []  # glibc's settings would outlive the test in this process: recorded, not applied
    monkeypatch.setattr(host_drift, "keep_freed_memory", lambda: kept.append(True))
    host_drift.main(["--model", "resnet10t", "-b", "1", "--img-size", "64", "--seconds", "1.5", "--window", "0.5",
                     "--malloc", malloc])
    out = capsys.readouterr().out
    assert out.startswith("host: ") and "threads" in out.splitlines()[0] and f"malloc: {malloc}" in out
    rows = re.findall(r"from\s+([\d.]+) s:\s+(\d+) batches, wall ([\d.]+), cpu ([\d.]+) \(cpu / wall ([\d.]+)\), "
                      r"(\d+) page faults", out)
    assert [float(start) for start, *_ in rows][:3] == [0.0, 0.5, 1.0] and all(int(n) > 0 for _, n, *_ in rows)
    assert re.search(r"window medians from [\d.]+ to [\d.]+ s: \d+% apart", out)
    assert kept == ([True] if malloc == "kept" else [])  # "kept" measures as benchmark.py measures
