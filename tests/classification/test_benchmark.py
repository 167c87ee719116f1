"""benchmark.py: one process per model, median and spread over interleaved rounds, the host with
every row, fused kernels claimed only where they run, bf16 rows where the CPU has the kernels, and
the official implementation measured from a checkout the user gives."""
import csv
import io
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from classification import benchmark
from tests.models.test_fused import ONEDNN_BF16

TINY = "pacavit_tiny_p2cconv_100_0"
QUICK = ["--img-size", 32, "-b", 1, "--iters", 1, "--warmup", 0, "--threads", 1, "--no-train"]


def run_benchmark(tmp_path, *args) -> list:
    csv_path = tmp_path / "results.csv"
    benchmark.main([*QUICK, "--results-csv", csv_path, *args])
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def fake_official_checkout(root):
    """A checkout laid out as github.com/iVMCL/PaCaViT: a ``models`` package (the same name as this
    repository's) whose paca_vit.py registers PaCa-ViT names with timm and imports a sibling module."""
    (root / "models" / "layers").mkdir(parents=True)
    (root / "models" / "__init__.py").write_text("from .paca_vit import OfficialNet\n")
    (root / "models" / "layers" / "__init__.py").write_text("WIDTH = 64\n")
    (root / "models" / "paca_vit.py").write_text(textwrap.dedent("""
        from torch import nn
        from timm.models._registry import register_model
        from .layers import WIDTH

        class OfficialNet(nn.Sequential):
            def __init__(self, num_classes=1000):
                super().__init__(nn.Conv2d(3, WIDTH, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(WIDTH, num_classes))

        @register_model
        def pacavit_tiny_p2cconv_100_0(pretrained=False, **kwargs):
            return OfficialNet(kwargs.pop("num_classes", 1000))
    """))
    return root


@pytest.mark.slow  # a process per model: about 20 s
def test_each_model_in_its_own_process_median_spread_peak_memory_and_host(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(benchmark, "cpu_bfloat16_supported", lambda: True)
    caplog.set_level("INFO", logger="pacavit")
    rows = run_benchmark(tmp_path, "--model", TINY, "--compare", "--peers", "convnext_base", "--rounds", 3,
                         "--fused-kernels", "both", "--precisions", "fp32,autocast-bf16", "--low-precision-models", TINY)
    got = [(r["model"], r["precision"], r["fused_kernels"], r["plain_ops"]) for r in rows]
    assert got == [(TINY, "fp32", "True", "False"), (TINY, "fp32", "False", "True"),
                   ("convnext_base", "fp32", "False", "False"),  # not PaCa: never claims the kernels
                   # the fused layers' bf16 kernels only where oneDNN has them (not on AVX2-only CPUs)
                   (TINY, "autocast-bf16", str(ONEDNN_BF16), "False"), (TINY, "autocast-bf16", "False", "True")]
    for row in rows:
        assert row["rounds"] == "3" and float(row["infer_spread_pct"]) >= 0 and float(row["infer_img_per_s"]) > 0
        assert row["host"] and "AVX" in row["isa"] and row["threads"] == "1" and row["torch"] == torch.__version__
    # each process holds its model only: convnext_base's 89M parameters show, PaCa-Tiny's 12M do not
    paca, convnext = float(rows[0]["infer_peak_mem_MB"]), float(rows[2]["infer_peak_mem_MB"])
    assert convnext > paca + 200, (paca, convnext)
    assert rows[3]["infer_efficiency"] == ""  # no reference measured in bf16: no ratio
    assert sum("round 3/3" in m for m in caplog.messages) == len(rows)
    assert any(m.startswith("host: ") and "threads" in m for m in caplog.messages)
    assert any("no official rows" in m for m in caplog.messages)  # one line, no checkout given


def test_without_bfloat16_kernels_the_bf16_rows_are_skipped_with_a_note(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(benchmark, "cpu_bfloat16_supported", lambda: False)
    caplog.set_level("INFO", logger="pacavit")
    rows = run_benchmark(tmp_path, "--model", TINY, "--precisions", "fp32,autocast-bf16,bf16")
    assert [(r["precision"], r["fused_kernels"]) for r in rows] == [("fp32", "True")]
    assert any("no bfloat16 kernels: skipping autocast-bf16, bf16" in m for m in caplog.messages)


@pytest.mark.slow  # a process per model of two implementations
def test_official_models_are_measured_from_a_checkout_beside_ours(tmp_path):
    checkout = fake_official_checkout(tmp_path / "PaCaViT")
    rows = run_benchmark(tmp_path, "--model", TINY, "--official", checkout, "--compare", "--peers", "convnext_tiny")
    assert [(r["model"], r["official"]) for r in rows] == [(TINY, "False"), ("convnext_tiny", "False"),
                                                          (TINY, "True")]
    ours, _, official = rows
    # the checkout's model was measured (64 conv channels), under its own package beside ours
    assert float(official["params_M"]) == pytest.approx((3 * 9 * 64 + 64 + 64 * 1000 + 1000) / 1e6, abs=1e-3)
    assert float(ours["params_M"]) == pytest.approx(12.2, abs=0.05)
    assert official["fused_kernels"] == "False" and float(official["infer_efficiency"]) > 0


def test_an_official_path_without_the_implementation_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.run_main(lambda: benchmark.main([*QUICK, "--model", TINY, "--official", tmp_path]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no models/paca_vit.py" in err and "iVMCL/PaCaViT" in err


def test_on_cuda_no_row_claims_the_fused_kernels():
    args = benchmark.parse_args(["--model", TINY, "--device", "cuda", "--fused-kernels", "both"])
    specs = benchmark.run_specs([TINY, "convnext_tiny"], args, torch.device("cuda"))
    assert [(s["model"], s["fused"], s["plain_ops"]) for s in specs] == [(TINY, False, False),
                                                                         ("convnext_tiny", False, False)]


def test_a_cuda_worker_benchmarks_cudnn_as_training_does(monkeypatch, capsys):
    seen = {}

    class FakeBench:
        def __init__(self, spec, args, device):
            seen["cudnn.benchmark"], seen["device"] = torch.backends.cudnn.benchmark, device
            self.row = {"params_M": 1.0}

    monkeypatch.setattr(benchmark, "ClassifierBench", FakeBench)
    monkeypatch.setattr(benchmark, "keep_freed_memory", lambda: seen.setdefault("keep_freed_memory", True))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    args = benchmark.parse_args(["--model", TINY, "--device", "cuda"])
    benchmark.worker_main(args, {"model": TINY, "official": False})
    assert seen == {"cudnn.benchmark": True, "device": torch.device("cuda"), "keep_freed_memory": True}
    assert capsys.readouterr().out == benchmark.RESULT_PREFIX + '{"params_M": 1.0}\n'


FAULTS_PER_BLOCK = """
import resource, sys, torch
from classification import benchmark
kept = benchmark.keep_freed_memory() if sys.argv[1] == "keep" else False
def block():  # 64 MB, above glibc's largest mmap threshold (32 MB), as convnext_tiny's MLP activations
    torch.empty(16 * 2**20).fill_(1.0)
for _ in range(3):  # the heap settles on the blocks it reuses
    block()
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# the median block: on this VM the kernel now and then takes a kept block's pages back between two
# blocks (one block faulted afresh without a syscall of the process releasing it)
print(kept, sorted(faults)[2])
"""


@pytest.mark.skipif(benchmark._glibc() is None, reason="glibc's malloc settings: Linux with glibc only")
def test_a_measuring_process_reuses_freed_memory_instead_of_page_faulting_it_again():
    def faults_per_block(mode):
        out = subprocess.run([sys.executable, "-c", FAULTS_PER_BLOCK, mode], cwd=benchmark.REPO_ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
        return out[0] == "True", float(out[1])

    assert faults_per_block("keep") == (True, pytest.approx(0, abs=200))
    kept, faults = faults_per_block("default")  # glibc maps the block afresh each time: 16384 pages
    assert not kept and faults > 10_000
    assert benchmark.host_info(torch.device("cpu"))["malloc"] == "freed memory kept"


def test_only_bfloat16_asked_on_a_cpu_without_it_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(benchmark, "cpu_bfloat16_supported", lambda: False)
    args = benchmark.parse_args(["--model", TINY, "--device", "cpu", "--amp"])
    with pytest.raises(benchmark.cls_common.UsageError, match="no bfloat16 kernels.*--precisions fp32"):
        benchmark.run_specs([TINY], args, torch.device("cpu"))


def test_the_cpu_clock_counts_the_process_cpu_time_and_not_waiting():
    def step():  # waits, as a process does while another holds the core: the wall clock counts it
        time.sleep(0.05)

    assert min(benchmark.time_iterations(step, torch.device("cpu"), 0, 2, "wall")) >= 0.05
    assert max(benchmark.time_iterations(step, torch.device("cpu"), 0, 2, "cpu")) < 0.02
    with pytest.raises(benchmark.cls_common.UsageError, match="--clock wall"):
        benchmark.parse_args(["--model", TINY, "--device", "cuda", "--clock", "cpu"])


def test_a_round_is_the_median_of_its_iterations_and_a_process_first_round_warms_up_longer(monkeypatch):
    args = benchmark.parse_args(["--model", TINY, "--device", "cpu", "--iters", "3", "--warmup", "1",
                                 "--train-iters", "2", "--threads", "1"])
    calls = []
    durations = iter([0.0] * 4 + [0.01, 0.5, 0.02]  # infer, round 1: 1 + 3 warm-up calls, then 3 timed
                     + [0.0] + [0.01, 0.02, 0.03])  # infer, round 2: 1 warm-up call, then 3 timed

    def step():
        calls.append(1)
        time.sleep(next(durations))

    bench = benchmark.ClassifierBench.__new__(benchmark.ClassifierBench)
    bench.args, bench.device, bench.measured = args, torch.device("cpu"), set()
    bench.model, bench.infer = torch.nn.Identity(), step
    first = bench.measure("infer")["seconds"]
    assert len(calls) == 7 and 0.02 <= first < 0.1  # the 0.5 s iteration does not move the median
    second = bench.measure("infer")["seconds"]
    assert len(calls) == 11 and 0.02 <= second < 0.03
    assert args.train_iters == 2 and benchmark.parse_args(["--model", TINY, "--iters", "4"]).train_iters == 4


def test_a_round_times_more_iterations_until_they_last_the_minimum():
    seconds = benchmark.time_iterations(lambda: time.sleep(0.01), torch.device("cpu"), 0, 2, "wall", min_seconds=0.06)
    assert len(seconds) >= 5 and sum(seconds) >= 0.06
    assert len(benchmark.time_iterations(lambda: None, torch.device("cpu"), 0, 3)) == 3


def test_rows_that_efficiency_compares_are_measured_together_one_group_at_a_time(monkeypatch):
    monkeypatch.setattr(benchmark, "cpu_bfloat16_supported", lambda: True)
    args = benchmark.parse_args(["--model", TINY, "--device", "cpu", "--fused-kernels", "both",
                                 "--precisions", "fp32,autocast-bf16", "--compile-modes", "both"])
    specs = benchmark.run_specs([TINY, "convnext_tiny"], args, torch.device("cpu"))
    groups = [[(s["model"], s["precision"], s["compile"], s["plain_ops"]) for s in group]
              for group in benchmark.comparison_groups(specs)]
    assert [{(p, c) for _, p, c, _ in group} for group in groups] == [
        {("fp32", False)}, {("fp32", True)}, {("autocast-bf16", False)}, {("autocast-bf16", True)}]
    assert groups[0] == [(TINY, "fp32", False, False), (TINY, "fp32", False, True), ("convnext_tiny", "fp32", False, False)]


def test_the_latency_curve_interleaves_rounds_over_the_models_and_reports_each_points_median_and_range(
        monkeypatch, tmp_path):
    asked = []
    # scripted ms per image: model "b" is slowed down in round 2 (the host, not the model)
    scripted = {("a", 32): [10, 20, 12], ("a", 64): [40, 80, 44], ("b", 32): [10, 30, 11], ("b", 64): [90, 250, 99]}

    class FakeWorker:
        def __init__(self, spec, argv):
            self.name, self.calls = spec["model"], {}
            assert spec["curve"] == [32, 64]

        def ask(self, line=""):
            if not line:
                return {}
            size = int(line.split()[1])
            asked.append((self.name, size))
            k = self.calls[size] = self.calls.get(size, -1) + 1
            return {"ms": scripted[self.name, size][k]}

        def close(self):
            pass

    monkeypatch.setattr(benchmark, "Worker", FakeWorker)
    args = benchmark.parse_args(["--model", TINY, "--rounds", "3"])
    rounds = benchmark.measure_curves(["a", "b"], [32, 64], args, [])
    # round 1 of every model at every size, then round 2, ...
    assert asked == [("a", 32), ("b", 32), ("a", 64), ("b", 64)] * 3
    assert benchmark.curve_points(rounds["b"]) == [(32, 11, 10, 30), (64, 99, 90, 250)]
    # the growth is taken within each round: b's slow round 2 gives x8.33, not 250/10
    median, low, high = benchmark.growth(rounds["b"])
    assert (round(median, 2), round(low, 2), round(high, 2)) == (9.0, 8.33, 9.0)
    assert benchmark.growth(rounds["a"])[0] == pytest.approx(4.0)
    csv_path = tmp_path / "curve.csv"
    benchmark.write_curves(csv_path, rounds, {"date": "d", "host": "h", "isa": "i", "threads": 2, "torch": "t"})
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["img_size"], r["rounds"], r["median_ms"], r["min_ms"], r["max_ms"]) for r in rows] == [
        ("a", "32", "3", "12", "10", "20"), ("a", "64", "3", "44", "40", "80"),
        ("b", "32", "3", "11", "10", "30"), ("b", "64", "3", "99", "90", "250")]


def test_a_curve_worker_builds_every_size_once_and_times_the_asked_one(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("curve 64\ncurve 32\ncurve 64\n"))
    args = benchmark.parse_args(["--model", TINY, "--device", "cpu", "--iters", "1", "--warmup", "0"])
    benchmark.worker_main(args, {"model": "pvt_v2_b1", "curve": [32, 64]})
    answers = [line for line in capsys.readouterr().out.splitlines() if line.startswith(benchmark.RESULT_PREFIX)]
    assert answers[0] == benchmark.RESULT_PREFIX + "{}"  # built
    assert len(answers) == 4 and all('"ms": ' in a for a in answers[1:])


def cpuinfo(vendor, family, model, name, flags="fpu avx2"):
    block = f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: {model}\n" \
            f"model name\t: {name}\nflags\t\t: {flags}\n"
    return block + "\n" + block.replace("processor\t: 0", "processor\t: 1")


@pytest.mark.parametrize("vendor, family, model, name, flags, expected", [
    # a cloud VM names only "AMD EPYC": family and model tell the core, AVX-512 tells Zen 4 from Zen 3
    ("AuthenticAMD", 25, 17, "AMD EPYC", "avx2 avx512f avx512_bf16", "AMD EPYC (Zen 4; family 25 model 17)"),
    ("AuthenticAMD", 25, 1, "AMD EPYC", "avx2", "AMD EPYC (Zen 3; family 25 model 1)"),
    ("AuthenticAMD", 26, 2, "AMD EPYC", "avx2 avx512f", "AMD EPYC (Zen 5; family 26 model 2)"),
    ("AuthenticAMD", 23, 49, "AMD EPYC 7B12", "avx2", "AMD EPYC 7B12 (Zen 2; family 23 model 49)"),
    ("AuthenticAMD", 23, 1, "AMD EPYC", "avx2", "AMD EPYC (Zen 1; family 23 model 1)"),
    ("GenuineIntel", 6, 143, "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz", "avx512f amx_bf16",
     "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz (family 6 model 143)"),
])
def test_the_host_names_the_cpu_family_and_for_amd_its_core(vendor, family, model, name, flags, expected):
    text = cpuinfo(vendor, family, model, name, flags)
    assert benchmark.cpu_name(text) == expected
    assert benchmark.cpu_flags(text) == set(flags.split())


def test_the_host_of_every_row_is_this_cpus_name_with_its_numbers(monkeypatch):
    monkeypatch.setattr(benchmark, "_cpuinfo", lambda: cpuinfo("AuthenticAMD", 25, 17, "AMD EPYC", "avx2 avx512f"))
    info = benchmark.host_info(torch.device("cpu"))
    assert info["host"] == "AMD EPYC (Zen 4; family 25 model 17)"
    assert info["isa"].startswith("AVX2 AVX-512 ATen ")
    # without /proc/cpuinfo (macOS) the name is what the platform says, without numbers
    monkeypatch.setattr(benchmark, "_cpuinfo", lambda: "")
    assert "family" not in benchmark.host_info(torch.device("cpu"))["host"]
