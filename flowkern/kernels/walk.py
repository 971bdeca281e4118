"""Trie walk + process rewards (Flower Eq. 10, preferences Sec. 3.3.3), one program per row.

Row b follows tokens[b, t] from the root: the child of node n by token x is found by binary
search among the sorted edge tokens offsets[n] .. offsets[n+1]−1 (as many probes as that
node's degree needs), and edge e leads to node e + 1.  The walk stops after the termination
token (length L = t) or at the first token that is no child (left_at = t); nothing after the
stop is read, and the rest of the row's outputs is cleared in blocks.  Then the leaf's canonical item
(binary search in leaf_nodes), the preference p of the row and
  log r_t = (log F(s_{t+1}) − log F(s_t)) / p   ("div")   or   + w·log p   ("add"),  t ≤ L.
Node and edge ids are int64 throughout.
"""

import torch
import triton
import triton.language as tl

from flowkern.trie import TrieWalk

NO_PREFERENCE, PER_ROW, PER_ITEM = 0, 1, 2


@triton.jit
def lower_bound(values_ptr, lo, hi, key, steps):
    """First index i in [lo, hi) with values[i] >= key (hi if none), `key` a scalar or a block
    (int64); `steps` ≥ log2(hi − lo + 1)."""
    key += tl.zeros((), tl.int64)
    lo += tl.zeros_like(key)
    hi += tl.zeros_like(key)
    for _ in range(steps):
        mid = (lo + hi) // 2
        open_ = lo < hi
        less = tl.load(values_ptr + mid, mask=open_, other=0).to(tl.int64) < key
        lo = tl.where(open_ & less, mid + 1, lo)
        hi = tl.where(open_ & ~less, mid, hi)
    return lo


_TAIL = tl.constexpr(64)  # positions cleared at once after a row stops


@triton.jit
def _walk_kernel(tokens_ptr, stride_tb, stride_tt, offsets_ptr, edge_tokens_ptr, log_flow_ptr, leaf_nodes_ptr,
                 leaf_item_offsets_ptr, leaf_items_ptr, rewards_ptr, stride_rb, stride_ri,
                 nodes_ptr, log_r_ptr, length_ptr, item_ptr, left_at_ptr, preference_ptr,
                 steps, eos, num_leaves, leaf_search_steps, pref_weight_ptr,
                 PREFERENCE: tl.constexpr, DIV: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    nodes_row = nodes_ptr + b * (steps + 1)
    log_r_row = log_r_ptr + b * steps
    tl.store(nodes_row, 0)
    node = tl.zeros((), dtype=tl.int64)
    leaf = tl.zeros((), dtype=tl.int64)
    length = tl.full((), -1, dtype=tl.int64)
    left_at = tl.full((), -1, dtype=tl.int64)
    t = tl.zeros((), dtype=tl.int64)
    active = t < steps
    while active:  # the walk is a chain of dependent loads: stop with the row
        token = tl.load(tokens_ptr + b * stride_tb + t * stride_tt).to(tl.int64)
        lo = tl.load(offsets_ptr + node)
        end = tl.load(offsets_ptr + node + 1)
        hi = end
        while lo < hi:  # binary search among this node's children only (one step for one child)
            mid = (lo + hi) // 2
            less = tl.load(edge_tokens_ptr + mid).to(tl.int64) < token
            lo = tl.where(less, mid + 1, lo)
            hi = tl.where(less, hi, mid)
        found = lo < end
        found &= tl.load(edge_tokens_ptr + lo, mask=found, other=-1).to(tl.int64) == token
        child = lo + 1
        left_at = tl.where(found, left_at, t)
        step_log_r = tl.load(log_flow_ptr + child, mask=found, other=0.0) - tl.load(log_flow_ptr + node)
        tl.store(log_r_row + t, tl.where(found, step_log_r, 0.0))
        tl.store(nodes_row + t + 1, tl.where(found, child, -1))
        ended = found & (token == eos)
        length = tl.where(ended, t, length)
        leaf = tl.where(ended, child, leaf)
        node = child
        t += 1
        active = found & ~ended & (t < steps)
    for start in range(t, steps, _TAIL):  # nothing after the stop is read: the rest is cleared
        position = start + tl.arange(0, _TAIL)
        tl.store(log_r_row + position, 0.0, mask=position < steps)
        tl.store(nodes_row + position + 1, -1, mask=position < steps)
    done = length >= 0
    slot = lower_bound(leaf_nodes_ptr, 0, num_leaves, leaf, leaf_search_steps)
    first_item = tl.load(leaf_item_offsets_ptr + slot, mask=done, other=0)
    item = tl.where(done, tl.load(leaf_items_ptr + first_item, mask=done, other=0).to(tl.int64), -1)
    preference = tl.full((), 1.0, dtype=tl.float64)
    if PREFERENCE == 1:
        preference = tl.load(rewards_ptr + b * stride_rb, mask=done, other=1.0).to(tl.float64)
    if PREFERENCE == 2:
        preference = tl.load(rewards_ptr + b * stride_rb + item * stride_ri, mask=done, other=1.0).to(tl.float64)
    for t in range(tl.where(done, 0, steps)):  # a row that reaches no leaf has no rewards
        tl.store(log_r_row + t, 0.0)
    if PREFERENCE != 0:
        for t in range(length + 1):
            log_r = tl.load(log_r_row + t)
            if DIV:
                log_r = log_r / preference
            else:
                log_r = log_r + tl.load(pref_weight_ptr) * tl.log(preference)
            tl.store(log_r_row + t, log_r)
    tl.store(length_ptr + b, length)
    tl.store(item_ptr + b, item)
    tl.store(left_at_ptr + b, left_at)
    tl.store(preference_ptr + b, preference)


def float64_scalar(value, device):
    """A float64 scalar argument: Triton passes Python floats to kernels as float32."""
    return torch.full((), value, dtype=torch.float64, device=device)


def walk_rewards(tokens, trie, rewards, pref_mode, pref_weight):
    """As flowkern.eager.walk_rewards: (TrieWalk with the personalised log r, preference (B,))."""
    batch, steps = tokens.shape
    device = tokens.device
    nodes = torch.empty(batch, steps + 1, dtype=torch.long, device=device)
    log_r = torch.empty(batch, steps, dtype=torch.float64, device=device)
    length, item, left_at = (torch.empty(batch, dtype=torch.long, device=device) for _ in range(3))
    preference = torch.empty(batch, dtype=torch.float64, device=device)
    kind = NO_PREFERENCE if rewards is None else PER_ROW if rewards.dim() == 1 else PER_ITEM
    reward_strides = (0, 0) if rewards is None else (rewards.stride(0), rewards.stride(-1))
    _walk_kernel[(batch,)](
        tokens, tokens.stride(0), tokens.stride(1), trie.offsets, trie.tokens, trie.log_flow, trie.leaf_nodes,
        trie.leaf_item_offsets, trie.leaf_items, preference if rewards is None else rewards, *reward_strides,
        nodes, log_r, length, item, left_at, preference,
        steps, trie.eos_token_id, trie.leaf_nodes.numel(), trie.leaf_nodes.numel().bit_length(),
        float64_scalar(pref_weight, device),
        PREFERENCE=kind, DIV=pref_mode == "div")
    return TrieWalk(nodes, log_r, length, item, left_at), preference
