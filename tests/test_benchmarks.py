"""The benchmark scripts run (quick mode: small sizes, nothing written); timings are not tested."""

import re
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_generation_benchmark_runs():
    out = subprocess.run([sys.executable, str(BENCHMARKS / "bench_generation.py"), "--quick"], capture_output=True,
                         text=True, check=True, timeout=600).stdout
    assert "flowkern.children_logits + sample" in out


def test_loss_benchmark_runs():
    out = subprocess.run([sys.executable, str(BENCHMARKS / "bench_subtb.py"), "--quick"], capture_output=True,
                         text=True, check=True, timeout=600).stdout
    assert "flowkern, PyTorch eager" in out and "published-style dict of prefix strings" in out


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
