// CSR prefix-trie builder behind flowkern.Trie (pybind11, no torch headers).
//
// Items are token sequences; the termination token is appended to each, so every item
// ends in a leaf of its own.  Nodes are numbered breadth-first with siblings in ascending
// token order.  Hence edges, listed by (parent, token), are exactly the non-root nodes in
// order: edge e leads to node e + 1, and the children of node n are the edges
// offsets[n] .. offsets[n + 1].  The flow of a node is the summed reward of the items
// below it (Flower, arXiv 2503.07377, Eq. 9); it is returned as log F(n) - log Z, Z = F(0).
//
// The build sorts the items (an MSD radix sort that stops at groups of one), then numbers
// the nodes in one pass over the sorted items.  Cost: O(total tokens * log branching);
// the GIL is released throughout.  `walk` follows token sequences down a built trie (CPU).

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <Python.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

constexpr int64_t kMaxId = std::numeric_limits<int32_t>::max();

struct Items {
  const int32_t* tokens;   // all items' tokens, concatenated
  const int64_t* offsets;  // item i is tokens[offsets[i] .. offsets[i + 1])
  const double* rewards;   // one per item
  int64_t count;
  int64_t num_tokens;
};

struct TrieArrays {
  std::vector<int64_t> offsets;            // N + 1
  std::vector<int32_t> tokens;             // E = N - 1
  std::vector<double> log_flow;            // N, root = 0
  double log_z = 0.0;
  std::vector<int64_t> level_offsets;      // nodes at depth d: [level_offsets[d], level_offsets[d + 1])
  std::vector<int32_t> leaf_nodes;         // distinct leaves, ascending
  std::vector<int64_t> leaf_item_offsets;  // items of leaf_nodes[k]: leaf_items[leaf_item_offsets[k] ..]
  std::vector<int32_t> leaf_items;         // ascending within each leaf
  std::vector<int32_t> item_leaf;          // leaf node of each item
};

[[noreturn]] void fail(const std::string& message) { throw std::invalid_argument(message); }

void validate(const Items& items, int64_t eos, const std::string& name) {
  if (items.count == 0) fail(name + " is empty: a trie needs at least one item");
  if (items.count > kMaxId) fail(name + " has more than 2^31 - 1 items");
  if (eos < 0 || eos > kMaxId)
    fail("eos_token_id must be in [0, 2^31 - 1], got " + std::to_string(eos));
  if (items.offsets[0] != 0) fail("offsets[0] must be 0, got " + std::to_string(items.offsets[0]));
  if (items.offsets[items.count] != items.num_tokens)
    fail("offsets[-1] must equal len(tokens) = " + std::to_string(items.num_tokens) + ", got " +
         std::to_string(items.offsets[items.count]));
  for (int64_t i = 0; i < items.count; ++i) {
    const int64_t begin = items.offsets[i], end = items.offsets[i + 1];
    if (end < begin) fail("offsets must be non-decreasing, but offsets[" + std::to_string(i + 1) +
                          "] < offsets[" + std::to_string(i) + "]");
    if (end > items.num_tokens)
      fail("offsets[" + std::to_string(i + 1) + "] = " + std::to_string(end) + " is past the end of tokens (" +
           std::to_string(items.num_tokens) + " tokens)");
    if (end == begin)
      fail(name + "[" + std::to_string(i) + "] is empty: every item needs at least one token");
    for (int64_t j = begin; j < end; ++j) {
      const int32_t token = items.tokens[j];
      if (token >= 0 && token != eos) continue;
      const std::string where = name + "[" + std::to_string(i) + "][" + std::to_string(j - begin) + "]";
      if (token < 0) fail(where + " = " + std::to_string(token) + " is negative: token ids must be >= 0");
      fail(where + " is the termination token (eos_token_id = " + std::to_string(eos) +
           "): items must not contain it, the trie appends it to every item");
    }
    const double reward = items.rewards[i];
    if (!(std::isfinite(reward) && reward > 0.0))
      fail("rewards[" + std::to_string(i) + "] = " + std::to_string(reward) +
           ": item rewards must be finite and > 0");
  }
}

int32_t token_at(const Items& items, int32_t item, int64_t depth, int32_t eos) {
  const int64_t pos = items.offsets[item] + depth;
  return pos < items.offsets[item + 1] ? items.tokens[pos] : eos;
}

// Sorts the items (termination token appended) lexicographically, in place, by MSD radix:
// the items that share a prefix of length d are sorted by their d-th token, and a run of
// equal tokens recurses unless it holds one item or ends in the termination token.
// Returns lcp[p], the common-prefix length of sorted items p - 1 and p (0 for p = 0).
std::vector<int64_t> sort_items(const Items& items, int32_t eos, std::vector<int32_t>& order) {
  std::vector<int64_t> lcp(items.count, 0);
  std::vector<std::pair<int64_t, int64_t>> groups{{0, items.count}}, next_groups;
  std::vector<uint64_t> keys;  // (token << 32) | item: orders by token, then by item id
  for (int64_t depth = 0; !groups.empty(); ++depth) {
    next_groups.clear();
    for (const auto& [begin, end] : groups) {
      keys.clear();
      for (int64_t p = begin; p < end; ++p)
        keys.push_back((static_cast<uint64_t>(token_at(items, order[p], depth, eos)) << 32) |
                       static_cast<uint32_t>(order[p]));
      std::sort(keys.begin(), keys.end());
      for (size_t k = 0; k < keys.size(); ++k) order[begin + k] = static_cast<int32_t>(keys[k] & 0xffffffffu);
      for (size_t run = 0; run < keys.size();) {
        const uint64_t token = keys[run] >> 32;
        size_t run_end = run + 1;
        while (run_end < keys.size() && (keys[run_end] >> 32) == token) ++run_end;
        if (run > 0) lcp[begin + run] = depth;
        if (token == static_cast<uint64_t>(eos))
          for (size_t k = run + 1; k < run_end; ++k) lcp[begin + k] = depth + 1;  // identical items
        else if (run_end - run > 1)
          next_groups.emplace_back(begin + run, begin + run_end);
        run = run_end;
      }
    }
    std::swap(groups, next_groups);
  }
  return lcp;
}

// In sorted order, item p owns the nodes of its path deeper than lcp[p]; the nodes of one
// depth are met in lexicographic order of their prefixes, which is breadth-first order.
TrieArrays build(const Items& items, int32_t eos) {
  const int64_t n = items.count;
  std::vector<int32_t> order(n);
  for (int64_t i = 0; i < n; ++i) order[i] = static_cast<int32_t>(i);
  const std::vector<int64_t> lcp = sort_items(items, eos, order);
  auto path_length = [&](int32_t item) { return items.offsets[item + 1] - items.offsets[item] + 1; };

  int64_t depth = 0;
  for (int64_t i = 0; i < n; ++i) depth = std::max(depth, path_length(static_cast<int32_t>(i)));
  std::vector<int64_t> new_nodes(depth + 2, 0);  // per depth, as a difference array
  for (int64_t p = 0; p < n; ++p) {
    ++new_nodes[lcp[p] + 1];
    --new_nodes[path_length(order[p]) + 1];
  }
  TrieArrays out;
  out.level_offsets = {0, 1};
  for (int64_t d = 1, size = 0; d <= depth; ++d) {
    size += new_nodes[d];
    out.level_offsets.push_back(out.level_offsets.back() + size);
  }
  const int64_t num_nodes = out.level_offsets.back();
  if (num_nodes - 1 > kMaxId) fail("the trie would have more than 2^31 - 1 nodes");

  out.tokens.resize(num_nodes - 1);
  std::vector<int32_t> parent(num_nodes - 1);  // of edge e, i.e. of node e + 1
  std::vector<int64_t> next_id(out.level_offsets.begin(), out.level_offsets.end() - 1);
  std::vector<int32_t> path(depth + 1, 0);     // node ids along the current item's path
  out.item_leaf.resize(n);
  for (int64_t p = 0; p < n; ++p) {
    const int32_t item = order[p];
    const int64_t length = path_length(item);
    for (int64_t d = lcp[p] + 1; d <= length; ++d) {
      const int32_t id = static_cast<int32_t>(next_id[d]++);
      out.tokens[id - 1] = token_at(items, item, d - 1, eos);
      parent[id - 1] = path[d - 1];
      path[d] = id;
    }
    out.item_leaf[item] = path[length];
  }

  // Leaves in ascending id: a stable sort of the sorted items by path length (ids rise
  // with depth, and within a depth in sorted order); items of one leaf stay ascending.
  std::vector<int64_t> slot(depth + 2, 0);
  for (int64_t p = 0; p < n; ++p) ++slot[path_length(order[p]) + 1];
  for (int64_t d = 1; d <= depth + 1; ++d) slot[d] += slot[d - 1];
  out.leaf_items.resize(n);
  for (int64_t p = 0; p < n; ++p) out.leaf_items[slot[path_length(order[p])]++] = order[p];
  out.leaf_item_offsets = {0};
  for (int64_t k = 0; k < n; ++k) {
    const int32_t leaf = out.item_leaf[out.leaf_items[k]];
    if (k > 0 && leaf == out.leaf_nodes.back()) {
      ++out.leaf_item_offsets.back();
    } else {
      out.leaf_nodes.push_back(leaf);
      out.leaf_item_offsets.push_back(k + 1);
    }
  }

  out.offsets.assign(num_nodes + 1, 0);
  for (int32_t p : parent) ++out.offsets[p + 1];
  for (int64_t v = 0; v < num_nodes; ++v) out.offsets[v + 1] += out.offsets[v];

  std::vector<double>& flow = out.log_flow;  // flows first, then their logs in place
  flow.assign(num_nodes, 0.0);
  for (int64_t i = 0; i < n; ++i) flow[out.item_leaf[i]] += items.rewards[i];
  for (int64_t e = num_nodes - 2; e >= 0; --e) flow[parent[e]] += flow[e + 1];  // children after parents
  if (!std::isfinite(flow[0])) fail("rewards: their sum overflows float64");
  out.log_z = std::log(flow[0]);
  for (double& f : flow) f = std::log(f) - out.log_z;
  return out;
}

// A numpy array that owns the vector's buffer (no copy).
template <typename T>
py::array_t<T> to_numpy(std::vector<T>&& values) {
  auto* owner = new std::vector<T>(std::move(values));
  py::capsule free_owner(owner, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array_t<T>(static_cast<py::ssize_t>(owner->size()), owner->data(), free_owner);
}

py::dict build_and_export(const Items& items, int64_t eos, const std::string& name) {
  TrieArrays trie;
  {
    py::gil_scoped_release release;
    validate(items, eos, name);
    trie = build(items, static_cast<int32_t>(eos));
  }
  py::dict out;
  out["offsets"] = to_numpy(std::move(trie.offsets));
  out["tokens"] = to_numpy(std::move(trie.tokens));
  out["log_flow"] = to_numpy(std::move(trie.log_flow));
  out["log_z"] = trie.log_z;
  out["eos_token_id"] = eos;
  out["level_offsets"] = to_numpy(std::move(trie.level_offsets));
  out["leaf_nodes"] = to_numpy(std::move(trie.leaf_nodes));
  out["leaf_item_offsets"] = to_numpy(std::move(trie.leaf_item_offsets));
  out["leaf_items"] = to_numpy(std::move(trie.leaf_items));
  out["item_leaf"] = to_numpy(std::move(trie.item_leaf));
  return out;
}

using Int32Array = py::array_t<int32_t, py::array::c_style>;
using Int64Array = py::array_t<int64_t, py::array::c_style>;
using FloatArray = py::array_t<double, py::array::c_style>;

void check_rewards(const FloatArray& rewards, int64_t count) {
  if (rewards.ndim() != 1 || rewards.shape(0) != count)
    fail("rewards must hold one value per item (" + std::to_string(count) + "), got " +
         std::to_string(rewards.size()));
}

py::dict build_ragged(const Int32Array& tokens, const Int64Array& offsets, const FloatArray& rewards,
                      int64_t eos) {
  if (tokens.ndim() != 1) fail("tokens must be one-dimensional");
  if (offsets.ndim() != 1 || offsets.shape(0) < 1)
    fail("offsets must be one-dimensional with num_items + 1 entries");
  const int64_t count = offsets.shape(0) - 1;
  check_rewards(rewards, count);
  return build_and_export({tokens.data(), offsets.data(), rewards.data(), count, tokens.shape(0)},
                          eos, "tokens");
}

// The same from a Python sequence of token sequences (lists, tuples, arrays, tensors).
py::dict build_lists(const py::sequence& sequences, const FloatArray& rewards, int64_t eos) {
  const int64_t count = static_cast<int64_t>(py::len(sequences));
  check_rewards(rewards, count);
  std::vector<int32_t> tokens;
  std::vector<int64_t> offsets{0};
  offsets.reserve(count + 1);
  for (int64_t i = 0; i < count; ++i) {
    py::object item = sequences[i];
    const std::string where = "sequences[" + std::to_string(i) + "]";
    if (py::isinstance<py::str>(item) || py::isinstance<py::bytes>(item))
      throw py::type_error(where + " is a string: tokenise titles into token ids first");
    PyObject* fast = PySequence_Fast(item.ptr(), "");
    if (fast == nullptr) {
      PyErr_Clear();
      throw py::type_error(where + " is a " + std::string(Py_TYPE(item.ptr())->tp_name) +
                           ", not a sequence of token ids");
    }
    py::object owner = py::reinterpret_steal<py::object>(fast);
    const Py_ssize_t length = PySequence_Fast_GET_SIZE(fast);
    PyObject** values = PySequence_Fast_ITEMS(fast);
    for (Py_ssize_t j = 0; j < length; ++j) {
      PyObject* index = PyNumber_Index(values[j]);
      if (index == nullptr) {
        PyErr_Clear();
        throw py::type_error(where + "[" + std::to_string(j) + "] is a " +
                             std::string(Py_TYPE(values[j])->tp_name) + ", not an integer token id");
      }
      int overflow = 0;
      const long long token = PyLong_AsLongLongAndOverflow(index, &overflow);
      Py_DECREF(index);
      if (overflow != 0 || token > kMaxId || token < std::numeric_limits<int32_t>::min())
        fail(where + "[" + std::to_string(j) + "] does not fit in int32: token ids must be in [0, 2^31 - 1]");
      tokens.push_back(static_cast<int32_t>(token));
    }
    offsets.push_back(static_cast<int64_t>(tokens.size()));
  }
  return build_and_export({tokens.data(), offsets.data(), rewards.data(), count,
                           static_cast<int64_t>(tokens.size())},
                          eos, "sequences");
}

// Trie.walk on CPU: each row followed from the root, one binary search among the sorted
// children per token, until its termination token or the first token that is not a child.
// Fills nodes (B, T + 1, -1 once stopped), log_reward (B, T), length and left_at (B,).
// The array sizes are checked once, each node's child range before it is searched.
py::dict walk(const Int64Array& offsets, const Int32Array& edge_tokens, const FloatArray& log_flow,
              int64_t eos, const Int64Array& tokens) {
  if (tokens.ndim() != 2) fail("tokens must be two-dimensional");
  if (log_flow.ndim() != 1 || log_flow.shape(0) < 1) fail("log_flow must be one-dimensional and non-empty");
  const int64_t num_nodes = log_flow.shape(0), num_edges = num_nodes - 1;
  if (offsets.ndim() != 1 || offsets.shape(0) != num_nodes + 1)
    fail("offsets must hold len(log_flow) + 1 = " + std::to_string(num_nodes + 1) + " entries, got " +
         std::to_string(offsets.size()));
  if (edge_tokens.ndim() != 1 || edge_tokens.shape(0) != num_edges)
    fail("edge_tokens must hold len(log_flow) - 1 = " + std::to_string(num_edges) + " entries, got " +
         std::to_string(edge_tokens.size()));
  const int64_t batch = tokens.shape(0), steps = tokens.shape(1);
  py::array_t<int64_t> nodes({batch, steps + 1});
  py::array_t<double> log_reward({batch, steps});
  py::array_t<int64_t> length(batch), left_at(batch);
  const int64_t* offset = offsets.data();
  const int32_t* edge_token = edge_tokens.data();
  const double* flow = log_flow.data();
  const int64_t* token = tokens.data();
  int64_t* node_out = nodes.mutable_data();
  double* reward_out = log_reward.mutable_data();
  int64_t* length_out = length.mutable_data();
  int64_t* left_out = left_at.mutable_data();
  {
    py::gil_scoped_release release;
    std::fill(node_out, node_out + batch * (steps + 1), -1);
    std::fill(reward_out, reward_out + batch * steps, 0.0);
    for (int64_t b = 0; b < batch; ++b) {
      int64_t* row_nodes = node_out + b * (steps + 1);
      const int64_t* row_tokens = token + b * steps;
      length_out[b] = left_out[b] = -1;
      int64_t node = 0;
      row_nodes[0] = 0;
      for (int64_t t = 0; t < steps; ++t) {
        const int64_t x = row_tokens[t];
        if (offset[node] < 0 || offset[node] > offset[node + 1] || offset[node + 1] > num_edges)
          fail("offsets[" + std::to_string(node) + ":" + std::to_string(node + 2) + "] = [" +
               std::to_string(offset[node]) + ", " + std::to_string(offset[node + 1]) +
               "] is not a range of the " + std::to_string(num_edges) + " edges");
        const int32_t* first = edge_token + offset[node];
        const int32_t* last = edge_token + offset[node + 1];
        const int32_t* edge = std::lower_bound(first, last, x, [](int32_t a, int64_t v) { return a < v; });
        if (edge == last || *edge != x) {
          left_out[b] = t;
          break;
        }
        const int64_t child = (edge - edge_token) + 1;  // edge e leads to node e + 1
        reward_out[b * steps + t] = flow[child] - flow[node];
        row_nodes[t + 1] = node = child;
        if (x == eos) {
          length_out[b] = t;
          break;
        }
      }
    }
  }
  py::dict out;
  out["nodes"] = nodes;
  out["log_reward"] = log_reward;
  out["length"] = length;
  out["left_at"] = left_at;
  return out;
}

}  // namespace

PYBIND11_MODULE(_flowkern_trie, m) {
  m.doc() = "CSR prefix-trie builder for flowkern (see flowkern.Trie).";
  m.def("build_ragged", &build_ragged, py::arg("tokens"), py::arg("offsets"), py::arg("rewards"),
        py::arg("eos_token_id"),
        "Build from flat int32 tokens and int64 item offsets; returns a dict of numpy arrays.");
  m.def("build_lists", &build_lists, py::arg("sequences"), py::arg("rewards"), py::arg("eos_token_id"),
        "Build from a sequence of token-id sequences; returns a dict of numpy arrays.");
  m.def("walk", &walk, py::arg("offsets"), py::arg("edge_tokens"), py::arg("log_flow"), py::arg("eos_token_id"),
        py::arg("tokens"), "Trie.walk of a (B, T) int64 array on CPU; returns a dict of numpy arrays.");
}
