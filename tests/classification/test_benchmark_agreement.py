"""benchmark_agreement.py: the two latest runs in the results CSV, paired row by row."""
import pytest

from classification import benchmark, benchmark_agreement

HOST = {"host": "AMD EPYC", "isa": "AVX2 AVX-512", "threads": 2, "omp_wait_policy": "default", "malloc": "freed memory kept",
        "torch": "2.14.1",
        "timm": "1.0.31", "device": "cpu x2 threads", "batch_size": 8, "img_size": 224, "compile": False, "plain_ops": False,
        "official": False, "precision": "fp32"}


def run(date, tiny_img_per_s, convnext_img_per_s=20.0, **host):
    return [{**HOST, **host, "date": date, "model": "pacavit_tiny_p2cconv_100_0", "infer_img_per_s": tiny_img_per_s,
             "infer_efficiency": round(tiny_img_per_s * 3.237 / (convnext_img_per_s * 4.47), 3)},
            {**HOST, **host, "date": date, "model": "convnext_tiny", "infer_img_per_s": convnext_img_per_s,
             "infer_efficiency": 1.0}]


def test_rows_of_the_two_latest_runs_are_paired_and_a_difference_beyond_the_tolerance_fails(tmp_path, capsys):
    path = tmp_path / "results.csv"
    for rows in (run("2026-01-01T00:00:00", 10.0), run("2026-01-02T00:00:00", 30.0), run("2026-01-03T00:00:00", 31.5)):
        benchmark.append_rows(path, rows)
    assert benchmark_agreement.main([str(path)]) == 0  # the oldest run (10 img/s) is not compared
    out = capsys.readouterr().out
    assert "| `pacavit_tiny_p2cconv_100_0` | fp32 | infer_img_per_s | 30 | 31.5 | 5.0% |" in out
    assert "4 figures; the largest difference is 5." in out and "0 beyond 10%" in out
    benchmark.append_rows(path, run("2026-01-04T00:00:00", 31.5, convnext_img_per_s=24.0))
    assert benchmark_agreement.main([str(path)]) == 1
    assert "| `convnext_tiny` | fp32 | infer_img_per_s | 20 | 24 | 20.0% |" in capsys.readouterr().out


def test_runs_from_different_hosts_or_too_few_runs_are_clear_errors(tmp_path):
    path = tmp_path / "results.csv"
    benchmark.append_rows(path, run("2026-01-01T00:00:00", 30.0))
    with pytest.raises(benchmark_agreement.UsageError, match="holds 1 run.*speed_report.sh again"):
        benchmark_agreement.main([str(path)])
    benchmark.append_rows(path, run("2026-01-02T00:00:00", 30.0, isa="AVX2"))
    with pytest.raises(benchmark_agreement.UsageError, match="different hosts"):
        benchmark_agreement.main([str(path)])
    # passive OpenMP waiting makes other figures (slower, PaCa more): not the same conditions
    benchmark.append_rows(path, run("2026-01-03T00:00:00", 30.0, isa="AVX2", omp_wait_policy="PASSIVE"))
    with pytest.raises(benchmark_agreement.UsageError, match="different hosts.*PASSIVE"):
        benchmark_agreement.main([str(path)])
    with pytest.raises(benchmark_agreement.UsageError, match="no such file"):
        benchmark_agreement.main([str(tmp_path / "none.csv")])
