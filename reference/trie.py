"""A prefix trie as nested Python dicts: the oracle for csrc/trie.cpp and Trie.walk.

Each node is a `Node` with a dict of children keyed by token id, its flow F (the summed
reward of the items below it) and, at leaves, the ids of its items.
"""

import math
from collections import deque


class Node:
    def __init__(self):
        self.children = {}
        self.flow = 0.0
        self.items = []


class DictTrie:
    def __init__(self, sequences, rewards, eos_token_id):
        self.eos = eos_token_id
        self.root = Node()
        self.num_items = len(sequences)
        self.leaf_of_item = []
        for item, (sequence, reward) in enumerate(zip(sequences, rewards)):
            node = self.root
            node.flow += reward
            for token in list(sequence) + [eos_token_id]:
                node = node.children.setdefault(int(token), Node())
                node.flow += reward
            node.items.append(item)
            self.leaf_of_item.append(node)

    def log_process_reward(self, parent, child):
        return math.log(child.flow) - math.log(parent.flow)

    def walk(self, tokens):
        """Walk one token sequence: (states s_0.., log r_t.., L or None, item or None, left_at or None)."""
        node, states, log_rewards = self.root, [self.root], []
        for t, token in enumerate(tokens):
            child = node.children.get(int(token))
            if child is None:
                return states, log_rewards, None, None, t
            log_rewards.append(self.log_process_reward(node, child))
            states.append(child)
            node = child
            if int(token) == self.eos:
                return states, log_rewards, t, min(child.items), None
        return states, log_rewards, None, None, None

    def breadth_first(self):
        """Nodes numbered breadth-first, siblings by ascending token, with (parent id, token)."""
        order, links, queue = [self.root], [None], deque([(self.root, 0)])
        while queue:
            node, node_id = queue.popleft()
            for token in sorted(node.children):
                child = node.children[token]
                links.append((node_id, token))
                queue.append((child, len(order)))
                order.append(child)
        return order, links

    def to_arrays(self):
        """The CSR arrays flowkern.Trie documents, computed the slow way."""
        order, links = self.breadth_first()
        ids = {id(node): i for i, node in enumerate(order)}
        offsets = [0]
        for node in order:
            offsets.append(offsets[-1] + len(node.children))
        depth = {0: 0}
        for i, link in enumerate(links[1:], start=1):
            depth[i] = depth[link[0]] + 1
        level_offsets = [0] + [sum(1 for d in depth.values() if d <= level) for level in range(max(depth.values()) + 1)]
        leaves = [i for i, node in enumerate(order) if node.items]
        leaf_item_offsets = [0]
        for i in leaves:
            leaf_item_offsets.append(leaf_item_offsets[-1] + len(order[i].items))
        return {
            "offsets": offsets,
            "tokens": [token for _, token in links[1:]],
            "log_flow": [math.log(node.flow) - math.log(self.root.flow) for node in order],
            "level_offsets": level_offsets,
            "leaf_nodes": leaves,
            "leaf_item_offsets": leaf_item_offsets,
            "leaf_items": [item for i in leaves for item in sorted(order[i].items)],
            "item_leaf": [ids[id(node)] for node in self.leaf_of_item],
            "log_z": math.log(self.root.flow),
        }
