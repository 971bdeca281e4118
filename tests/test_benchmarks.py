"""The benchmark scripts run (quick mode: small sizes, nothing written); timings are not tested."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"


def test_generation_benchmark_runs():
    out = subprocess.run([sys.executable, str(BENCHMARKS / "bench_generation.py"), "--quick"], capture_output=True,
                         text=True, check=True, timeout=600).stdout
    assert "flowkern.children_logits + sample" in out


def test_loss_benchmark_runs():
    """Without the Triton interpreter (the dry run of gpu_check.sh runs its rows)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(BENCHMARKS / "bench_subtb.py"), "--quick"], capture_output=True,
                         text=True, check=True, timeout=600, env=env).stdout
    assert "| flowkern, Flower form, PyTorch |" in out and "| flowkern, Flower form, PyTorch, inplace_grad |" in out
    assert "| flowkern, process form, trie policy, PyTorch |" in out and "| Flower form: log π | PyTorch |" in out
    assert "published-style dict of prefix strings" in out


def test_restricted_head_benchmark_runs():
    out = subprocess.run([sys.executable, str(BENCHMARKS / "bench_restricted.py"), "--quick"], capture_output=True,
                         text=True, check=True, timeout=600).stdout
    assert "| trie policy (process form) | frozen |" in out and "| full head (--full-head) |" in out
    assert "| evaluation: 1 prompt x 50 | restricted |" in out and "## Targets of issue 7" in out


def test_row_gradient_count_runs():
    out = subprocess.run([sys.executable, str(BENCHMARKS / "subtb_row_gradients.py"), "--data",
                          "movies"], capture_output=True,
                         text=True, check=True, timeout=600).stdout
    assert re.fullmatch(r"w = 0\.01: in [\d,]+ of the [\d,]+ output rows the SubTB term touches, .*\n", out)


def test_recommend_benchmark_runs():
    out = subprocess.run([sys.executable, str(BENCHMARKS / "bench_recommend.py"), "--quick"], capture_output=True,
                         text=True, check=True, timeout=600).stdout
    assert "| before (d5744dc): chunks of 8 |" in out and "| after: batch_size=8 |" in out
    assert out.count("| 8/8 |") == 4  # every variant ranks as before


def test_hostile_inputs_count_runs():
    out = subprocess.run([sys.executable, str(BENCHMARKS / "hostile_inputs.py")], capture_output=True, text=True,
                         check=True, timeout=600).stdout
    assert out.endswith("22 hostile calls:\n  clear error: 21\n  correct: 1\n  other error: 0\n  silent: 0\n"
                        "  crash: 0\n")


def test_trie_corruptions_count_runs():
    out = subprocess.run([sys.executable, str(BENCHMARKS / "trie_corruptions.py")], capture_output=True, text=True,
                         check=True, timeout=600).stdout
    assert "450 corrupted files:\n" in out and "  accepted, wrong: 0\n  crash: 0\n" in out


def test_gpu_marker_selects_the_full_size_tests():
    out = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "tests/test_kernels.py"], capture_output=True, text=True, check=True, timeout=600,
                         cwd=ROOT).stdout
    selected = [line for line in out.splitlines() if "::" in line]
    assert len(selected) == 6 and all("::test_full_size_on_gpu_matches_torch_path[" in line for line in selected)


def test_gpu_check_dry_run_runs_every_stage_of_its_header():
    """bash benchmarks/gpu_check.sh --dry-run: every stage its header lists (within 8 minutes
    on a GPU) prints its line, ok or skipped for want of CUDA, and the results file lands
    outside benchmarks/results."""
    script = (BENCHMARKS / "gpu_check.sh").read_text()
    header = dict(re.findall(r"^#   ([a-z-]+) +(\d+)  ", script, re.M))
    assert header == dict(re.findall(r"^ *stage ([a-z-]+) (\d+) ", script, re.M))
    assert sum(map(int, header.values())) <= 8 * 60
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])  # its python3
    run = subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh"), "--dry-run"], capture_output=True, text=True,
                         timeout=300, cwd=ROOT, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    outcomes = dict(re.findall(r"^stage ([a-z-]+): (.*)$", run.stdout, re.M))
    assert outcomes.keys() == header.keys()
    assert all(outcome.startswith(("ok in", "skipped: no CUDA")) for outcome in outcomes.values()), outcomes
    results = Path(re.search(r"^results: (.*)$", run.stdout, re.M)[1])
    assert results.is_file() and BENCHMARKS / "results" not in results.parents
    assert all(f"stage {name}: " in results.read_text() for name in header)
    shutil.rmtree(results.parent)  # the script's temp dir
