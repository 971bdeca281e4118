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

Every `Trie` is checked against this layout when it is made (built, loaded, or changed with
`dataclasses.replace`): `_check_invariants` refuses anything else with a ValueError that
names the array, so the C++ walk and the kernels index only arrays that form a trie.
"""

from __future__ import annotations

import dataclasses
import math
import os
import zipfile
import zlib
from typing import NamedTuple

import numpy as np
import torch

from flowkern._checks import check_token_tensor, describe

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
_TORCH_DTYPES = {dtype: torch.from_numpy(np.empty(0, dtype)).dtype for dtype in set(_ARRAYS.values())}
_SCALARS = {"format_version": np.int64, "eos_token_id": np.int64, "log_z": np.float64}  # as stored
_LOG_FLOW_TOLERANCE = 1e-8  # |log F stored − log F from the rewards|: summation order only


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
    max_token: int = dataclasses.field(init=False)  # derived from the arrays when checked
    max_degree: int = dataclasses.field(init=False)
    min_depth: int = dataclasses.field(init=False)  # shortest item plus its termination token

    def __post_init__(self):
        for name, value in zip(("max_token", "max_degree", "min_depth"), _check_invariants(self)):
            object.__setattr__(self, name, value)

    @classmethod
    def _unchecked(cls, **fields) -> "Trie":
        """A trie of arrays already checked (moved to a device, or unpacked inside an op)."""
        trie = object.__new__(cls)
        for name, value in fields.items():
            object.__setattr__(trie, name, value)
        return trie

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
        return cls(**{name: torch.from_numpy(np.ascontiguousarray(arrays[name], dtype))
                      for name, dtype in _ARRAYS.items()}, eos_token_id=eos_token_id, log_z=log_z)

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
        fields = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        return Trie._unchecked(**dict(fields, **{name: getattr(self, name).to(device) for name in _ARRAYS}))

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
        """Read a trie written by `save`: its arrays are read as raw data of the dtypes `save`
        writes (no pickles, nothing allocated beyond the archive's bytes), then checked as
        every Trie is.  Any fault is a ValueError naming the file and the array."""
        try:
            arrays = _read_npz(path)
            version = int(arrays["format_version"])
            if version != FORMAT_VERSION:
                raise ValueError(f"format_version is {version}; this flowkern reads version {FORMAT_VERSION}")
            return cls._from_numpy(arrays, float(arrays["log_z"]), int(arrays["eos_token_id"]))
        except ValueError as error:
            raise ValueError(f"{os.fspath(path)!r} does not hold a flowkern trie: {error}") from None

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


def _read_npz(path) -> dict:
    """The arrays of `save`'s file by name, each read only after its .npy header shows the
    dtype and the number of dimensions `save` writes and a size the archive really holds
    (members are stored uncompressed, as `save` writes them, so nothing read is larger
    than the file)."""
    expected = {name: (dtype, 1) for name, dtype in _ARRAYS.items()} | {
        name: (dtype, 0) for name, dtype in _SCALARS.items()}
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    arrays = {}
    try:
        with zipfile.ZipFile(path) as archive:
            members = {info.filename.removesuffix(".npy"): info for info in archive.infolist()}
            missing = [name for name in expected if name not in members]
            if missing:
                raise ValueError(f"the archive has no {', '.join(missing)}")
            for name, (dtype, ndim) in expected.items():
                if members[name].compress_type != zipfile.ZIP_STORED:
                    raise ValueError(f"{name} is compressed; Trie.save stores arrays uncompressed")
                with archive.open(members[name]) as member:
                    version = np.lib.format.read_magic(member)
                    if version not in readers:
                        raise ValueError(f"{name} has .npy format version {version}")
                    try:
                        shape, _, stored = readers[version](member)
                    except ValueError as error:
                        raise ValueError(f"{name} has a malformed .npy header ({error})") from None
                    if stored != np.dtype(dtype) or len(shape) != ndim:
                        raise ValueError(f"{name} must be a {ndim}-dimensional {np.dtype(dtype).name} array, "
                                         f"got a {len(shape)}-dimensional {stored} array")
                    size = math.prod(shape) * stored.itemsize
                    data = member.read(size) if size <= members[name].compress_size else b""
                    if len(data) != size:
                        raise ValueError(f"{name} declares shape {shape} but the archive holds fewer bytes")
                    arrays[name] = np.frombuffer(bytearray(data), dtype).reshape(shape)
    except (zipfile.BadZipFile, zlib.error, EOFError) as error:
        raise ValueError(f"it is not a readable .npz archive ({error})") from None
    return arrays


def _check_invariants(trie: Trie) -> tuple[int, int, int]:
    """Refuse a trie whose fields are not the layout the module docstring describes, with a
    ValueError naming the field; returns (max_token, max_degree, min_depth).  Vectorised
    NumPy, O(nodes + items).  The flows are recomputed level by level from the leaves,
    F(n) = Σ_{x under n} R(x), and must match log_flow and log_z to summation rounding."""
    eos = trie.eos_token_id
    if isinstance(eos, bool) or not isinstance(eos, (int, np.integer)) or not 0 <= eos <= np.iinfo(np.int32).max:
        raise ValueError(f"eos_token_id must be an int in [0, 2^31 - 1], got {eos!r}")
    if isinstance(trie.log_z, bool) or not isinstance(trie.log_z, (int, float, np.floating)):
        raise ValueError(f"log_z must be a float, got {describe(trie.log_z)}")
    for name, dtype in _ARRAYS.items():
        value = getattr(trie, name)
        if not isinstance(value, torch.Tensor) or value.dim() != 1 or value.dtype != _TORCH_DTYPES[dtype]:
            raise ValueError(f"{name} must be a one-dimensional {np.dtype(dtype).name} tensor, got {describe(value)}")
        if value.device != trie.offsets.device or value.device.type == "meta":
            raise ValueError(f"{name} is on {value.device}: a trie's arrays share one device that holds data")
    a = {name: getattr(trie, name).detach().cpu().numpy() for name in _ARRAYS}
    offsets, tokens, log_flow, levels = a["offsets"], a["tokens"], a["log_flow"], a["level_offsets"]
    leaf_nodes, leaf_item_offsets, leaf_items, item_leaf = (a[name] for name in (
        "leaf_nodes", "leaf_item_offsets", "leaf_items", "item_leaf"))
    nodes, items = log_flow.size, item_leaf.size
    _require(nodes >= 2, "log_flow", f"must hold one entry per node, at least 2, got {nodes}")
    for name, size, rule in (("offsets", nodes + 1, "len(log_flow) + 1"), ("tokens", nodes - 1, "len(log_flow) - 1"),
                             ("leaf_items", items, "len(item_leaf)"), ("item_rewards", items, "len(item_leaf)"),
                             ("leaf_item_offsets", leaf_nodes.size + 1, "len(leaf_nodes) + 1")):
        _require(a[name].size == size, name, f"must hold {rule} = {size} entries, got {a[name].size}")
    _require(items >= 1 and leaf_nodes.size >= 1, "item_leaf", "must hold at least one item")
    _rising("offsets", offsets, nodes - 1, strict=False)
    _require(bool((tokens >= 0).all()), "tokens", "must hold token ids >= 0")
    parent = np.repeat(np.arange(nodes), np.diff(offsets))  # of edge e, i.e. of node e + 1
    _require(bool((parent < np.arange(1, nodes)).all()), "offsets",
             "must give every node a parent of a smaller id (a tree numbered breadth-first)")
    siblings = parent[1:] == parent[:-1]
    _require(bool((tokens[1:][siblings] > tokens[:-1][siblings]).all()), "tokens",
             "must hold each node's children in strictly ascending token order")
    _rising("level_offsets", levels, nodes, strict=True)
    _require(levels.size >= 3 and np.array_equal(offsets[levels[:-1]] + 1, levels[1:]), "level_offsets",
             "must bound the depths: the children of the nodes at depth d are the nodes at depth d + 1")
    _require(np.array_equal(np.flatnonzero(offsets[1:] == offsets[:-1]), leaf_nodes), "leaf_nodes",
             "must list the childless nodes, ascending")
    _require(np.array_equal(np.flatnonzero(tokens == eos) + 1, leaf_nodes), "eos_token_id",
             f"= {eos} must be the token of exactly the edges into the leaves")
    _rising("leaf_item_offsets", leaf_item_offsets, items, strict=True)
    _require(bool(((leaf_items >= 0) & (leaf_items < items)).all())
             and bool((np.bincount(leaf_items, minlength=items) == 1).all()), "leaf_items",
             "must list every item once")
    first = np.zeros(items, dtype=bool)
    first[leaf_item_offsets[:-1]] = True
    _require(bool((np.diff(leaf_items)[~first[1:]] > 0).all()), "leaf_items", "must be ascending within each leaf")
    _require(np.array_equal(item_leaf[leaf_items], np.repeat(leaf_nodes, np.diff(leaf_item_offsets))), "item_leaf",
             "must map each item to the leaf that lists it")
    rewards = a["item_rewards"]
    _require(bool((np.isfinite(rewards) & (rewards > 0)).all()), "item_rewards", "must be finite and > 0")
    flow = np.bincount(item_leaf, weights=rewards, minlength=nodes)
    for d in range(levels.size - 2, 0, -1):  # depth d's flows into their parents at depth d - 1
        above, begin, end = levels[d - 1], levels[d], levels[d + 1]
        flow[above:begin] += np.bincount(parent[begin - 1:end - 1] - above, weights=flow[begin:end],
                                         minlength=begin - above)
    _require(bool(np.isfinite(flow[0])), "item_rewards", "must have a finite sum")
    expected = np.log(flow) - np.log(flow[0])
    _require(bool((np.abs(log_flow - expected) <= _LOG_FLOW_TOLERANCE).all()), "log_flow",
             "must be log F(n) − log Z, F(n) the summed item_rewards of the items below node n")
    _require(abs(trie.log_z - math.log(flow[0])) <= _LOG_FLOW_TOLERANCE, "log_z",
             f"must be log Σ item_rewards = {math.log(flow[0])!r}, got {trie.log_z!r}")
    min_depth = int(np.searchsorted(levels, leaf_nodes[0], side="right")) - 1
    return int(tokens.max()), int(np.diff(offsets).max()), min_depth


def _require(holds: bool, name: str, expected: str) -> None:
    if not holds:
        raise ValueError(f"{name} {expected}")


def _rising(name: str, values: np.ndarray, last: int, strict: bool) -> None:
    """values[0] = 0, values[-1] = last, rising (strictly or not) in between."""
    steps = np.diff(values)
    rising = (steps > 0).all() if strict else (steps >= 0).all()
    _require(values.size >= 2 and values[0] == 0 and values[-1] == last and bool(rising), name,
             f"must rise {'strictly ' if strict else ''}from 0 to {last}")
