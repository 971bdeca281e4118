"""Count what flowkern does with the hostile calls of issue 13 (the C++ trie, the loss's
numbers, generation), each run in a forked child so that a crash is counted, not suffered:

  clear error   a ValueError whose message names the argument at fault
  correct       a result that is right (where returning one is the intended behaviour)
  other error   any other exception, or a ValueError that names something else
  silent        a result that is non-finite or wrong, returned without a word
  crash         the child died (a signal) or hung

The corrupted trie files are counted by benchmarks/trie_corruptions.py.  Without a CUDA GPU
the Triton backend runs under the Triton interpreter (TRITON_INTERPRET=1 is set here).
Run: python benchmarks/hostile_inputs.py [--list]
"""

import argparse
import collections
import dataclasses
import os
import signal
import sys
from types import SimpleNamespace

import numpy as np
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import print_counts  # noqa: E402
import flowkern  # noqa: E402

OUTCOMES = ("clear error", "correct", "other error", "silent", "crash")
TRIE = flowkern.Trie.build([[1, 2], [1], [3, 4, 5]], [1.0, 2.0, 3.0], eos_token_id=0)
TOKENS = torch.tensor([[1, 2, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0], [3, 4, 5, 0, 0, 0]])
LOGITS = torch.randn(3, 6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def walk_of(**arrays):
    walk = dataclasses.replace(TRIE, **arrays).walk(TOKENS)
    return SimpleNamespace(wrong=True, value=walk)  # any walk of arrays that are no trie is wrong


def loss(backend, logits=LOGITS, **options):
    value = flowkern.subtb_loss(logits, TRIE, tokens=TOKENS, backend=backend, **options)
    return SimpleNamespace(wrong=not bool(torch.isfinite(value)), value=value)


class FixedLogits(torch.nn.Module):
    """A model whose next-token logits are `row` at every position."""

    def __init__(self, row):
        super().__init__()
        self.row, self.anchor = row, torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=True):
        past_key_values.update(input_ids[:, None, :, None].float(), input_ids[:, None, :, None].float(), 0)
        return SimpleNamespace(logits=self.row.expand(input_ids.shape[0], input_ids.shape[1], -1))


def row(value, columns=range(8)):
    out = torch.zeros(8)
    out[list(columns)] = value
    return out


def recommend(value):
    found = flowkern.recommend(FixedLogits(row(value)), [[7]], TRIE, k=2)
    return SimpleNamespace(wrong=bool((found.items < 0).any() | ~torch.isfinite(found.scores).all()), value=found)


def sample(value):
    found = flowkern.sample(FixedLogits(row(value)), [[7]], TRIE, num_samples=4)
    return SimpleNamespace(wrong=bool((found.items < 0).any()), value=found)


def processor(scores, pad_token_id=None, allowed=None, generated=()):
    """The processor's scores after the prompt [7] and the `generated` tokens."""
    input_ids = torch.tensor([[7, *generated]])
    out = flowkern.TrieLogitsProcessor(TRIE, prompt_length=1, pad_token_id=pad_token_id)(input_ids, scores[None])
    finite = set((out[0] > -float("inf")).nonzero().view(-1).tolist())
    return SimpleNamespace(wrong=bool(out.isnan().any()) or (allowed is not None and finite != allowed), value=out)


def cases():
    """(label, the argument a clear error names, call)."""
    yield "from_ragged, an offset past the tokens", "offsets", lambda: flowkern.Trie.from_ragged(
        np.array([5, 6, 7], np.int32), np.array([0, 100, 3]), eos_token_id=2**31 - 1)
    yield "walk of a trie whose offsets were multiplied by 100", "offsets", lambda: walk_of(offsets=TRIE.offsets * 100)
    yield "walk of a trie with a short log_flow", "log_flow", lambda: walk_of(log_flow=TRIE.log_flow[:3])
    yield "walk of a trie with negative offsets", "offsets", lambda: walk_of(offsets=TRIE.offsets - 3)
    for backend in ("torch", "triton"):
        yield f"{backend}: lam = 1e308", "lam", lambda b=backend: loss(b, lam=1e308)
        yield f"{backend}: lam = 1e10, float32 logits", "lam", lambda b=backend: loss(b, LOGITS.float(), lam=1e10)
        yield f"{backend}: a preference score of 1e-300, div", "rewards", lambda b=backend: loss(
            b, rewards=torch.tensor([1.0, 1e-300, 1.0], dtype=torch.float64))
        yield f"{backend}: pref_weight = 1e308", "pref_weight", lambda b=backend: loss(
            b, rewards=torch.tensor([2.0, 3.0, 4.0]), pref_mode="add", pref_weight=1e308)
        yield f"{backend}: float64 logits of 1e300", "logits", lambda b=backend: loss(b, LOGITS * 1e300)
    for value in (float("nan"), float("inf"), -float("inf")):
        yield f"recommend, logits {value}", "logits", lambda v=value: recommend(v)
    yield "sample, logits nan", "logits", lambda: sample(float("nan"))
    yield "TrieLogitsProcessor, NaN scores", "scores", lambda: processor(row(float("nan")))
    yield "TrieLogitsProcessor, children all -inf", "(none: stays -inf)", lambda: processor(
        row(-float("inf"), [1, 3]), allowed=set())
    yield "TrieLogitsProcessor, pad_token_id = -1, after an item", "pad_token_id", lambda: processor(
        row(0.0), pad_token_id=-1, allowed={0}, generated=(1, 2, 0))
    yield "TrieLogitsProcessor, pad_token_id = V", "pad_token_id", lambda: processor(row(0.0), pad_token_id=8)


def outcome(call, names) -> int:
    try:
        result = call()
    except ValueError as error:
        return 0 if names in str(error) else 2
    except Exception:  # noqa: BLE001 - what is counted here is exactly the unexpected kinds
        return 2
    return 3 if result.wrong else 1


def classify(call, names) -> int:
    pid = os.fork()
    if pid == 0:
        signal.alarm(60)
        code = 4
        try:
            code = outcome(call, names)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 4


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print each call's outcome")
    args = parser.parse_args()
    counts = collections.Counter()
    for label, names, call in cases():
        result = OUTCOMES[classify(call, names)]
        counts[result] += 1
        if args.list:
            print(f"{result}: {label}")
    print_counts("hostile calls", counts, OUTCOMES)


if __name__ == "__main__":
    sys.exit(main())
