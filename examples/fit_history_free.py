"""Fit the Flower paper's history-free movie distribution (RQ1) with flowkern.subtb_loss.

The 100 titles of data/history_free/select_100_Movies.json, tokenised with Qwen2.5, form
the item trie; a title's reward is its interaction count.  A tabular policy (a free logit
for every token at every trie node) stands in for the LLM, and SubTB (process form, trie
policy) trains it on all titles.  At the optimum each title is generated with probability
count / total; the script prints how close the policy gets (JS divergence, exact, by
enumerating the titles) and the most popular titles before and after.

    python examples/fit_history_free.py [--steps 300] [--lr 0.05] [--lam 1.0]
"""

import argparse
import json
import math
import os

import torch

import flowkern

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "data")
EOS = 198  # Qwen2.5's "\n"


def load_titles():
    with open(os.path.join(DATA, "history_free", "select_100_Movies.json")) as f:
        counts = json.load(f)
    with open(os.path.join(DATA, "qwen2.5_title_ids.json")) as f:
        ids = json.load(f)
    titles = sorted(counts, key=counts.get, reverse=True)
    return titles, [ids[t] for t in titles], torch.tensor([float(counts[t]) for t in titles], dtype=torch.float64)


def js_divergence(p, q):
    m = (p + q) / 2
    return float(0.5 * (p * (p / m).log()).sum() + 0.5 * (q * (q / m).log()).sum())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="optimiser steps (default 300)")
    parser.add_argument("--lr", type=float, default=0.05, help="Adam learning rate (default 0.05)")
    parser.add_argument("--lam", type=float, default=1.0, help="SubTB subtrajectory decay λ (default 1)")
    args = parser.parse_args()

    titles, sequences, counts = load_titles()
    # A compact vocabulary: the tokens the titles use, renumbered 0.. (eos included).
    vocab = sorted({token for sequence in sequences for token in sequence} | {EOS})
    local = {token: i for i, token in enumerate(vocab)}
    trie = flowkern.Trie.build([[local[x] for x in s] for s in sequences], counts, eos_token_id=local[EOS])
    steps = trie.depth
    tokens = torch.tensor([[local[x] for x in s] + [local[EOS]] * (steps - len(s)) for s in sequences])
    states = trie.walk(tokens).nodes[:, :-1].clamp(min=0)  # s_t of every position (root after the end)
    print(f"{trie}: {len(titles)} titles, {len(vocab)} distinct Qwen2.5 tokens")

    table = torch.zeros(trie.num_nodes, len(vocab), dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.Adam([table], lr=args.lr)
    target = counts / counts.sum()

    def report(step, loss):
        with torch.no_grad():
            policy = flowkern.sequence_log_probs(table[states], trie, tokens=tokens).exp()
        print(f"step {step:4d}  SubTB {loss:10.5f}  JS(target, policy) {js_divergence(target, policy):.6f}")
        return policy

    before = report(0, flowkern.subtb_loss(table[states], trie, tokens=tokens, lam=args.lam).item())
    for step in range(1, args.steps + 1):
        loss = flowkern.subtb_loss(table[states], trie, tokens=tokens, lam=args.lam)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % max(1, args.steps // 5) == 0 or step == args.steps:
            after = report(step, loss.item())

    print(f"\n{'title':45s} {'target':>8s} {'before':>8s} {'after':>8s}")
    for i in range(8):
        print(f"{titles[i][:45]:45s} {target[i]:8.4f} {before[i]:8.4f} {after[i]:8.4f}")
    print(f"JS divergence: {js_divergence(target, before):.4f} before, {js_divergence(target, after):.6f} after "
          f"({math.log(2):.3f} is the maximum)")


if __name__ == "__main__":
    main()
