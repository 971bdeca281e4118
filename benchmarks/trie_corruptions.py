"""Count what Trie.load does with corrupted copies of a saved trie (tests/corruptions.py).

Each file is loaded in a forked child, so that a crash is counted, not suffered.  Outcomes:
  refused, naming the array   a ValueError that names the corrupted array (or, for a file
                              that is no archive, says so)
  refused, naming another     a ValueError that names an array the corruption made inconsistent
                              (e.g. log_flow, when item_rewards changed)
  refused, other              any other exception (a bare KeyError, TypeError, MemoryError...)
  accepted, the same trie     the corruption changed nothing the trie holds
  accepted, a consistent trie the arrays are Trie.build of their own items (other titles)
  accepted, wrong             anything else that loads: silently wrong results later
  crash                       the child died (signal) or hung
--cost times the check itself (flowkern.trie._check_invariants, run by every Trie's
constructor and so by load) on a trie of 200,000 random 20-token items (~4.1M nodes).
Run: python benchmarks/trie_corruptions.py [--list] [--cost]
"""

import argparse
import collections
import importlib.util
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import print_counts  # noqa: E402
import flowkern  # noqa: E402
from flowkern.trie import _check_invariants  # noqa: E402

_spec = importlib.util.spec_from_file_location("corruptions", Path(__file__).resolve().parents[1] / "tests" /
                                               "corruptions.py")
corruptions = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(corruptions)

OUTCOMES = ("refused, naming the array", "refused, naming another", "refused, other", "accepted, the same trie", "accepted, a consistent trie",
            "accepted, wrong", "crash")


def outcome(path, blamed, original) -> int:
    """The index of the outcome of loading `path` (run in the child)."""
    try:
        trie = flowkern.Trie.load(path)
    except ValueError as error:
        return corruptions.refusal(str(error), blamed)
    except Exception:  # noqa: BLE001 - what is counted here is exactly the unexpected kinds
        return 2
    if corruptions.same_trie(trie, original):
        return 3
    try:
        return 4 if corruptions.same_trie(trie, corruptions.rebuilt(trie)) else 5
    except Exception:  # noqa: BLE001
        return 5


def classify(path, blamed, original) -> int:
    pid = os.fork()
    if pid == 0:
        signal.alarm(30)
        code = 6
        try:
            code = outcome(path, blamed, original)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 6


def check_cost() -> None:
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 150_000, size=4_000_000, dtype=np.int32)
    trie = flowkern.Trie.from_ragged(tokens, np.arange(0, tokens.size + 1, 20), eos_token_id=0)
    seconds = []
    for _ in range(5):
        start = time.perf_counter()
        _check_invariants(trie)
        seconds.append(time.perf_counter() - start)
    print(f"invariant check: {min(seconds) * 1e3:.1f} ms for {trie.num_nodes:,} nodes, "
          f"{min(seconds) * 1e3 / (trie.num_nodes / 1e6):.1f} ms per million nodes (best of 5)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print each case that is not refused naming the array")
    parser.add_argument("--cost", action="store_true", help="also time the invariant check on a large trie")
    args = parser.parse_args()
    if args.cost:
        check_cost()
    original = corruptions.sample_trie()
    counts = collections.Counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trie.npz"
        for label, blamed, content in corruptions.corruptions(corruptions.saved_arrays(original, Path(tmp))):
            corruptions.write(path, content)
            result = classify(path, blamed, original)
            counts[OUTCOMES[result]] += 1
            if args.list and result:
                print(f"{OUTCOMES[result]}: {label}")
    print_counts("corrupted files", counts, OUTCOMES)


if __name__ == "__main__":
    sys.exit(main())
