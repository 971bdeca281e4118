"""The item catalogue as a prefix trie of token ids, in CSR form.

Every item is its title's token ids followed by the termination token (Qwen2.5: "\\n" =
198), so every item has a leaf of its own; items with the same tokens share a leaf.  The
flow of a node is the summed reward of the items below it, F(n) = Σ_{x under n} R(x)
(Flower, arXiv 2503.07377, Eq. 9), stored as log_flow[n] = log F(n) − log Z with Z = F(root).
The process reward of the token that moves s → s' is r = F(s') / F(s) (Eq. 10); along any
item the rewards multiply to R(x) / Z.

Layout (built by csrc/trie.cpp).  Node 0 is the root; nodes are numbered breadth-first
with siblings in ascending token order, so:
  - the children of node n are the edges offsets[n] .. offsets[n + 1] − 1, their tokens
    tokens[offsets[n]:offsets[n + 1]] sorted ascending (binary search);
  - edge e leads to node e + 1 (`children` is therefore arange(1, num_nodes));
  - the nodes at depth d are level_offsets[d] .. level_offsets[d + 1] − 1;
  - leaf_nodes[k] holds items leaf_items[leaf_item_offsets[k] : leaf_item_offsets[k + 1]],
    ascending; the first of them is the leaf's canonical item.
"""

from __future__ import annotations

import dataclasses
import os
from typing import NamedTuple

import numpy as np
import torch

from flowkern._checks import check_token_tensor

try:  # top-level, so that any copy of these sources finds the installed build (setup.py)
    import _flowkern_trie as _trie
except ModuleNotFoundError as error:
    if error.name != "_flowkern_trie":
        raise
    raise ImportError("flowkern's C++ extension _flowkern_trie is not built: install flowkern with "
                      "`pip install .` (or `pip install -e .`), or run `python setup.py build_ext --inplace` "
                      "in its source tree") from None

FORMAT_VERSION = 1
_ARRAYS = {  # name -> dtype, as stored and as held on any device
    "offsets": np.int64, "tokens": np.int32, "log_flow": np.float64, "level_offsets": np.int64,
    "leaf_nodes": np.int32, "leaf_item_offsets": np.int64, "leaf_items": np.int32,
    "item_leaf": np.int32, "item_rewards": np.float64,
}


class TrieWalk(NamedTuple):
    """Where a batch of token sequences goes in the trie (see `Trie.walk`).

    nodes:      (B, T + 1) int64, nodes[b, t] = s_t (s_0 = root); −1 once the walk stopped.
    log_reward: (B, T) float64, log r_t = log F(s_{t+1}) − log F(s_t) where s_{t+1} exists, else 0.
    length:     (B,) int64, position L_b of the termination token, −1 if the walk never reached a leaf.
    item:       (B,) int64, canonical item id of the leaf reached, −1 if none.
    left_at:    (B,) int64, first position whose token is not a child of its state, −1 if none.
    A row with length = −1 and left_at = −1 stayed in the trie but ran out of positions.
    """

    nodes: torch.Tensor
    log_reward: torch.Tensor
    length: torch.Tensor
    item: torch.Tensor
    left_at: torch.Tensor


@dataclasses.dataclass(frozen=True, eq=False)
class Trie:
    """Prefix trie of items with log flows; build with `Trie.build` or `Trie.load`."""

    offsets: torch.Tensor
    tokens: torch.Tensor
    log_flow: torch.Tensor
    level_offsets: torch.Tensor
    leaf_nodes: torch.Tensor
    leaf_item_offsets: torch.Tensor
    leaf_items: torch.Tensor
    item_leaf: torch.Tensor
    item_rewards: torch.Tensor
    eos_token_id: int
    log_z: float
    max_token: int
    max_degree: int
    min_depth: int  # shortest item plus its termination token

    @classmethod
    def build(cls, sequences, rewards=None, *, eos_token_id: int) -> "Trie":
        """Trie of `sequences` (token-id sequences, one per item; the termination token is
        appended here) with one reward per item (> 0; default all 1)."""
        if isinstance(sequences, (str, bytes)) or not hasattr(sequences, "__len__"):
            raise TypeError(f"sequences must be a list of token-id sequences, got {type(sequences).__name__}")
        if isinstance(sequences, (np.ndarray, torch.Tensor)):
            sequences = list(sequences)
        rewards = _rewards_array(rewards, len(sequences))
        return cls._from_build(_trie.build_lists(sequences, rewards, _eos(eos_token_id)), rewards)

    @classmethod
    def from_ragged(cls, tokens, offsets, rewards=None, *, eos_token_id: int) -> "Trie":
        """Trie of items given as flat token ids and item offsets: item i is
        tokens[offsets[i]:offsets[i + 1]]."""
        tokens = _integer_array("tokens", tokens, np.int32)
        offsets = _integer_array("offsets", offsets, np.int64)
        rewards = _rewards_array(rewards, max(len(offsets) - 1, 0))
        return cls._from_build(_trie.build_ragged(tokens, offsets, rewards, _eos(eos_token_id)), rewards)

    @classmethod
    def _from_build(cls, arrays: dict, rewards: np.ndarray) -> "Trie":
        return cls._from_numpy(dict(arrays, item_rewards=rewards), float(arrays["log_z"]),
                               int(arrays["eos_token_id"]))

    @classmethod
    def _from_numpy(cls, arrays: dict, log_z: float, eos_token_id: int) -> "Trie":
        shallowest_leaf = arrays["leaf_nodes"][0]  # breadth-first numbering: the lowest leaf id
        return cls(**{name: torch.from_numpy(np.ascontiguousarray(arrays[name], dtype))
                      for name, dtype in _ARRAYS.items()},
                   eos_token_id=eos_token_id, log_z=log_z, max_token=int(arrays["tokens"].max()),
                   max_degree=int(np.diff(arrays["offsets"]).max()),
                   min_depth=int(np.searchsorted(arrays["level_offsets"], shallowest_leaf, side="right")) - 1)

    # ---- sizes and derived views -------------------------------------------------------
    @property
    def num_nodes(self) -> int:
        return self.log_flow.numel()

    @property
    def num_edges(self) -> int:
        return self.tokens.numel()

    @property
    def num_items(self) -> int:
        return self.item_leaf.numel()

    @property
    def depth(self) -> int:
        """Longest path from the root, in tokens: the longest item plus its termination token."""
        return self.level_offsets.numel() - 2

    @property
    def device(self) -> torch.device:
        return self.offsets.device

    @property
    def children(self) -> torch.Tensor:
        """Child node of each edge (int32, E): edge e leads to node e + 1."""
        return torch.arange(1, self.num_nodes, dtype=torch.int32, device=self.device)

    @property
    def node_depth(self) -> torch.Tensor:
        """Depth of each node (int64, N), from the breadth-first level boundaries."""
        sizes = self.level_offsets.diff()
        return torch.repeat_interleave(torch.arange(sizes.numel(), device=self.device), sizes)

    def to(self, device) -> "Trie":
        """The same trie with its arrays on `device`."""
        return dataclasses.replace(self, **{name: getattr(self, name).to(device) for name in _ARRAYS})

    def __repr__(self) -> str:
        return (f"Trie(num_items={self.num_items}, num_nodes={self.num_nodes}, depth={self.depth}, "
                f"eos_token_id={self.eos_token_id}, device={self.device})")

    # ---- persistence --------------------------------------------------------------------
    def save(self, path) -> None:
        """Write the trie to a `.npz` file (no pickled objects)."""
        arrays = {name: getattr(self, name).cpu().numpy() for name in _ARRAYS}
        with open(path, "wb") as f:
            np.savez(f, format_version=np.int64(FORMAT_VERSION), eos_token_id=np.int64(self.eos_token_id),
                     log_z=np.float64(self.log_z), **arrays)

    @classmethod
    def load(cls, path) -> "Trie":
        """Read a trie written by `save`; checks the format version and the structure."""
        with np.load(path, allow_pickle=False) as f:
            if "format_version" not in f.files:
                raise ValueError(f"{os.fspath(path)!r} is not a flowkern trie file (no format_version)")
            version = int(f["format_version"])
            if version != FORMAT_VERSION:
                raise ValueError(f"{os.fspath(path)!r} has trie format version {version}; "
                                 f"this flowkern reads version {FORMAT_VERSION}")
            missing = sorted(set(_ARRAYS) - set(f.files))
            if missing:
                raise ValueError(f"{os.fspath(path)!r} is missing trie arrays {missing}")
            arrays = {name: f[name] for name in _ARRAYS}
            eos_token_id, log_z = int(f["eos_token_id"]), float(f["log_z"])
        _check_structure(arrays, path)
        return cls._from_numpy(arrays, log_z, eos_token_id)

    # ---- walking token sequences --------------------------------------------------------
    def walk(self, tokens: torch.Tensor) -> TrieWalk:
        """Follow each row of a (B, T) batch of token ids from the root (see `TrieWalk`).

        A row stops at its first termination token (after which nothing is read) or at the
        first token that is not a child of its state.  Binary search among the sorted
        children: on CPU in C++ (csrc/trie.cpp), a row at a time; elsewhere vectorised over
        rows in PyTorch, one step per position (`_walk_tensors`)."""
        check_token_tensor("tokens", tokens)
        if tokens.device != self.device:
            raise ValueError(f"tokens are on {tokens.device} but the trie is on {self.device}: "
                             f"use trie.to(tokens.device)")
        if self.device.type != "cpu":
            return self._walk_tensors(tokens)
        arrays = _trie.walk(self.offsets.numpy(), self.tokens.numpy(), self.log_flow.numpy(), self.eos_token_id,
                            tokens.long().contiguous().numpy())
        nodes, log_reward, length, left_at = (torch.from_numpy(arrays[name])
                                              for name in ("nodes", "log_reward", "length", "left_at"))
        return self._finish_walk(nodes, log_reward, length, left_at)

    def _walk_tensors(self, tokens: torch.Tensor) -> TrieWalk:
        """`walk` with torch operations on the trie's device."""
        batch, steps = tokens.shape
        device = self.device
        tokens = tokens.long()
        nodes = torch.full((batch, steps + 1), -1, dtype=torch.long, device=device)
        nodes[:, 0] = 0
        log_reward = torch.zeros(batch, steps, dtype=torch.float64, device=device)
        length = torch.full((batch,), -1, dtype=torch.long, device=device)
        left_at = torch.full((batch,), -1, dtype=torch.long, device=device)
        node = torch.zeros(batch, dtype=torch.long, device=device)
        active = torch.ones(batch, dtype=torch.bool, device=device)
        for t in range(steps):
            token = tokens[:, t]
            child, found = self._child(node, token)
            found &= active
            left_at = torch.where(active & ~found, t, left_at)
            log_reward[:, t] = torch.where(found, self.log_flow[child] - self.log_flow[node], 0.0)
            nodes[:, t + 1] = torch.where(found, child, -1)
            ended = found & (token == self.eos_token_id)
            length = torch.where(ended, t, length)
            active = found & ~ended
            node = torch.where(found, child, 0)
        return self._finish_walk(nodes, log_reward, length, left_at)

    def _finish_walk(self, nodes, log_reward, length, left_at) -> TrieWalk:
        leaf = nodes.gather(1, (length + 1).clamp(min=0)[:, None])[:, 0]
        item = torch.where(length >= 0, self.leaf_item(leaf), -1)
        return TrieWalk(nodes, log_reward, length, item, left_at)

    def _child(self, node: torch.Tensor, token: torch.Tensor):
        """Child of each node by each token (lower-bound binary search in the CSR); returns
        (child node id, found).  Rows where found is False get an arbitrary child id."""
        lo, end = self.offsets[node], self.offsets[node + 1]
        hi = end
        last_edge = self.num_edges - 1
        for _ in range(self.max_degree.bit_length()):
            mid = (lo + hi) // 2
            less = self.tokens[mid.clamp(max=last_edge)] < token
            open_ = lo < hi
            lo, hi = torch.where(open_ & less, mid + 1, lo), torch.where(open_ & ~less, mid, hi)
        edge = lo.clamp(max=last_edge)
        found = (lo < end) & (self.tokens[edge] == token)
        return edge + 1, found

    def leaf_item(self, leaf: torch.Tensor) -> torch.Tensor:
        """The canonical (smallest) item id of each leaf node; arbitrary for other nodes."""
        k = torch.searchsorted(self.leaf_nodes, leaf.to(self.leaf_nodes.dtype))
        k = k.clamp(max=self.leaf_nodes.numel() - 1)
        return self.leaf_items[self.leaf_item_offsets[k]].long()


def _eos(eos_token_id) -> int:
    if isinstance(eos_token_id, bool) or not isinstance(eos_token_id, (int, np.integer)):
        raise TypeError(f"eos_token_id must be an int, got {type(eos_token_id).__name__}")
    return int(eos_token_id)


def _rewards_array(rewards, count: int) -> np.ndarray:
    if rewards is None:
        return np.ones(count, dtype=np.float64)
    if isinstance(rewards, torch.Tensor):
        rewards = rewards.detach().cpu().numpy()
    array = np.asarray(rewards)
    if array.dtype.kind not in "iuf":
        raise TypeError(f"rewards must be numbers, got dtype {array.dtype}")
    if array.shape != (count,):
        raise ValueError(f"rewards must hold one value per item ({count}), got shape {array.shape}")
    return np.ascontiguousarray(array, dtype=np.float64)


def _integer_array(name: str, values, dtype) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.size and array.dtype.kind not in "iu":
        raise TypeError(f"{name} must be integers, got dtype {array.dtype}")
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    info = np.iinfo(dtype)
    if array.size and (array.min() < info.min or array.max() > info.max):
        raise ValueError(f"{name} must fit in {np.dtype(dtype).name}, got values in "
                         f"[{array.min()}, {array.max()}]")
    return np.ascontiguousarray(array, dtype=dtype)


def _check_structure(arrays: dict, path) -> None:
    """Reject a file whose arrays do not form a trie (sizes or indices out of range)."""
    offsets, tokens, level_offsets = arrays["offsets"], arrays["tokens"], arrays["level_offsets"]
    leaf_nodes, leaf_item_offsets = arrays["leaf_nodes"], arrays["leaf_item_offsets"]
    num_nodes, num_items = arrays["log_flow"].size, arrays["item_leaf"].size
    checks = [
        ("one-dimensional arrays", lambda: all(arrays[name].ndim == 1 for name in _ARRAYS)),
        ("num_nodes = len(tokens) + 1 = len(offsets) - 1 >= 2",
         lambda: num_nodes >= 2 and tokens.size == num_nodes - 1 and offsets.size == num_nodes + 1),
        ("offsets rising from 0 to len(tokens)",
         lambda: offsets[0] == 0 and offsets[-1] == tokens.size and np.all(np.diff(offsets) >= 0)),
        ("token ids in [0, 2^31 - 1]", lambda: tokens.min() >= 0 and tokens.max() <= np.iinfo(np.int32).max),
        ("level_offsets rising from 0 to num_nodes",
         lambda: level_offsets.size >= 3 and level_offsets[0] == 0 and level_offsets[-1] == num_nodes
         and np.all(np.diff(level_offsets) > 0)),
        ("one reward, one leaf entry per item", lambda: num_items >= 1 and arrays["item_rewards"].size
         == num_items and arrays["leaf_items"].size == num_items),
        ("leaf_item_offsets rising from 0 to num_items",
         lambda: leaf_item_offsets.size == leaf_nodes.size + 1 and leaf_item_offsets[0] == 0
         and leaf_item_offsets[-1] == num_items and np.all(np.diff(leaf_item_offsets) > 0)),
        ("leaf and item ids in range",
         lambda: leaf_nodes.min() >= 1 and leaf_nodes.max() < num_nodes and arrays["item_leaf"].min() >= 1
         and arrays["item_leaf"].max() < num_nodes and arrays["leaf_items"].min() >= 0
         and arrays["leaf_items"].max() < num_items),
    ]
    for expected, holds in checks:
        if not holds():
            raise ValueError(f"{os.fspath(path)!r} does not hold a consistent trie: expected {expected}")
