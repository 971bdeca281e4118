"""flowkern.semantic_ids: residual k-means gives unique, deterministic codes that follow the
data's clusters; the codes survive a save and refuse a damaged file; the code tokens join
the embedded Qwen2's vocabulary, build a trie, and come back with `load_model`."""

import itertools
import json
import os
import re

import numpy as np
import pytest
import torch

import flowkern
from flowkern import semantic_ids
from flowkern.data import DataError
from flowkern.models import load_model
from flowkern.sasrec import SASRec, SASRecConfig
from flowkern.semantic_ids import (FILE, CodeTokenizer, SemanticIDs, add_code_tokens, rq_kmeans,
                                   sasrec_item_embeddings, title_embeddings)

LEVELS, CODEBOOK = 2, 8
TITLES = [f"{adjective} {noun} ({1970 + i})" for i, (adjective, noun) in enumerate(itertools.product(
    ("Dark", "Silent", "Lost", "Red", "Last"), ("City", "River", "Night", "Garden", "Empire", "Road")))]


def random_embeddings(n, dims, seed):
    return torch.randn(n, dims, generator=torch.Generator().manual_seed(seed))


def blobs():
    """4 far-apart blobs × 3 sub-blobs (the same 3 offsets in every blob) × 3 items each;
    (N, 8) embeddings, each item's blob and sub-blob."""
    generator = torch.Generator().manual_seed(3)
    centres, offsets = 100 * torch.randn(4, 8, generator=generator), 10 * torch.randn(3, 8, generator=generator)
    blob, sub = torch.arange(36) // 9, torch.arange(36) // 3 % 3
    return centres[blob] + offsets[sub] + 0.1 * torch.randn(36, 8, generator=generator), blob, sub


@pytest.mark.parametrize("embeddings, levels, codebook_size", [
    (random_embeddings(300, 16, 0), 3, 8),
    (random_embeddings(5, 8, 1).repeat(40, 1), 3, 64),  # 200 items on 5 points: the last level separates them
    (random_embeddings(3, 4, 2), 3, 64),               # fewer items than codes
    (random_embeddings(1, 4, 3), 1, 2),
    (blobs()[0].double(), 1, 32),
])
def test_every_item_gets_a_unique_code_in_range(embeddings, levels, codebook_size):
    codes = rq_kmeans(embeddings, levels=levels, codebook_size=codebook_size)
    assert codes.dtype == torch.int64 and codes.shape == (len(embeddings), levels + 1)
    assert len(torch.unique(codes, dim=0)) == len(embeddings)
    assert codes.min() >= 0 and codes.max() < codebook_size


def test_the_last_level_numbers_the_items_of_a_prefix_in_id_order():
    codes = rq_kmeans(random_embeddings(5, 8, 1).repeat(40, 1), levels=3, codebook_size=64)
    for item in range(5):
        assert codes[item::5, -1].tolist() == list(range(40))
        assert (codes[item::5, :-1] == codes[item, :-1]).all()


def test_the_codes_depend_on_the_seed_only():
    embeddings = random_embeddings(400, 16, 4)
    first = rq_kmeans(embeddings, levels=3, codebook_size=8, seed=7)
    torch.manual_seed(123)  # the global generator plays no part
    assert torch.equal(rq_kmeans(embeddings, levels=3, codebook_size=8, seed=7), first)
    assert torch.equal(rq_kmeans(embeddings.float(), levels=3, codebook_size=8, seed=7), first)


def test_level_one_finds_the_blobs_and_level_two_the_sub_blobs_of_the_residuals():
    embeddings, blob, sub = blobs()
    codes = rq_kmeans(embeddings, levels=2, codebook_size=4)
    first = {b: set(codes[blob == b, 0].tolist()) for b in range(4)}
    assert all(len(found) == 1 for found in first.values())
    assert len(set.union(*first.values())) == 4
    # the residuals hold the sub-blob offsets: every (level 1, level 2) prefix is one sub-blob
    for prefix in torch.unique(codes[:, :2], dim=0):
        members = (codes[:, :2] == prefix).all(1)
        assert len(set(zip(blob[members].tolist(), sub[members].tolist()))) == 1


def test_an_empty_cluster_is_re_seeded_at_the_farthest_point(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    corners = torch.tensor([[50.0, 50.0], [60.0, 50.0], [50.0, 60.0]], dtype=torch.float64)
    x = corners.repeat_interleave(5, 0) + 0.1 * torch.randn(15, 2, generator=generator, dtype=torch.float64)
    # a bad start: one centroid between two corners, one far from every point (empty at once)
    start = torch.tensor([[55.0, 50.0], [50.0, 60.0], [1000.0, 1000.0]], dtype=torch.float64)
    monkeypatch.setattr(semantic_ids, "_kmeans_plus_plus", lambda x, k, generator: start)
    _, assignment = semantic_ids._kmeans(x, 3, 25, generator)
    assert [set(assignment[i:i + 5].tolist()) for i in (0, 5, 10)] in ([{0}, {2}, {1}], [{2}, {0}, {1}])


def test_save_load_round_trip(tmp_path):
    ids = SemanticIDs.fit(random_embeddings(50, 8, 5), levels=LEVELS, codebook_size=CODEBOOK)
    ids.save(tmp_path)
    loaded = SemanticIDs.load(tmp_path)
    assert torch.equal(loaded.codes, ids.codes) and loaded.codebook_size == CODEBOOK
    assert loaded.texts() == ids.texts() and loaded.saved_first_id is None
    assert [loaded.item_of(text) for text in ids.texts()] == list(range(50))
    assert re.fullmatch(r"<a_\d><b_\d><c_\d>", ids.text(0))
    assert len(ids.vocabulary()) == (LEVELS + 1) * CODEBOOK == len(set(ids.vocabulary()))
    with pytest.raises(ValueError, match=re.escape("'<a_0><b_0><c_9>'")):
        ids.item_of("<a_0><b_0><c_9>")


def rewrite(path, change):
    with open(path) as f:
        saved = json.load(f)
    change(saved)
    with open(path, "w") as f:
        json.dump(saved, f)


def edit_code(saved):
    """Item 0's codes changed to codes no item has (likely), so only the fingerprint tells."""
    saved["codes"][0][0] = (saved["codes"][0][0] + 1) % CODEBOOK
    saved["codes"][0][-1] = CODEBOOK - 1


@pytest.mark.parametrize("damage", [
    lambda path: os.remove(path),
    lambda path: open(path, "a").write("}"),
    lambda path: rewrite(path, edit_code),
    lambda path: rewrite(path, lambda saved: saved.update(version=2)),
    lambda path: rewrite(path, lambda saved: saved["codes"][1].__setitem__(0, CODEBOOK)),
    lambda path: rewrite(path, lambda saved: saved.update(codes=saved["codes"][:1] * 2)),
])
def test_a_damaged_file_raises_data_error_naming_it(tmp_path, damage):
    SemanticIDs.fit(random_embeddings(50, 8, 5), levels=LEVELS, codebook_size=CODEBOOK).save(tmp_path)
    path = os.path.join(tmp_path, FILE)
    damage(path)
    with pytest.raises(DataError, match=re.escape(path)):
        SemanticIDs.load(tmp_path)


@pytest.mark.parametrize("call, match", [
    (lambda: rq_kmeans(torch.tensor([[0.0, 1.0]] * 3 + [[float("nan"), 0.0]])),
     "embeddings holds NaN or inf at item 3"),
    (lambda: rq_kmeans(torch.zeros(5)), "embeddings"),
    (lambda: rq_kmeans(torch.zeros(4, 2, dtype=torch.long)), "embeddings"),
    (lambda: rq_kmeans(random_embeddings(5, 8, 1).repeat(23, 1), levels=1, codebook_size=8),
     r"codebook_size=8 with levels=1 cannot give unique codes: 23 items share the codes \(\d,\); raise"),
    (lambda: rq_kmeans(random_embeddings(5, 2, 0), levels=0), "levels"),
    (lambda: rq_kmeans(random_embeddings(5, 2, 0), codebook_size=1), "codebook_size"),
    (lambda: rq_kmeans(random_embeddings(5, 2, 0), iterations=0), "iterations"),
    (lambda: SemanticIDs(torch.tensor([[0, 1], [0, 1]]), 4), "items 0 and 1 share"),
    (lambda: SemanticIDs(torch.tensor([[0, 4]]), 4), "codebook_size"),
])
def test_bad_arguments_raise_value_error_naming_them(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_sasrec_item_embeddings_leave_out_the_padding_row():
    model = SASRec(10, SASRecConfig(hidden=8))
    embeddings = sasrec_item_embeddings(model)
    assert torch.equal(embeddings, model.items.weight[:10])
    embeddings += 1
    assert not torch.equal(embeddings, model.items.weight[:10])  # a copy


@pytest.fixture(scope="module")
def qwen():
    loaded = load_model(None, seed=0)
    return loaded.model, loaded.tokenizer


@pytest.fixture(scope="module")
def embedded(qwen):
    """The embedded Qwen2 with the code tokens of its own title embeddings."""
    model, base = qwen
    rows = model.get_input_embeddings().num_embeddings
    ids = SemanticIDs.fit(title_embeddings(model, base, TITLES, batch_size=8), levels=LEVELS, codebook_size=CODEBOOK)
    return model, base, ids, add_code_tokens(model, base, ids), rows


def test_title_embeddings_pool_each_title_over_its_own_tokens_only(qwen):
    model, tokenizer = qwen
    model.train()  # dropout off inside, the mode restored after
    together = title_embeddings(model, tokenizer, TITLES[:2] + ["A much longer title, padded beside the others"])
    alone = title_embeddings(model, tokenizer, TITLES[:2], batch_size=1)
    assert together.shape == (3, 64) and model.training
    torch.testing.assert_close(together[:2], alone)
    assert not torch.allclose(alone[0], alone[1])
    with pytest.raises(ValueError, match="titles: item 1"):
        title_embeddings(model, tokenizer, ["Heat", ""])


def test_add_code_tokens_grows_the_embeddings_and_the_tied_head(embedded):
    model, base, ids, tok, rows = embedded
    vocabulary = ids.vocabulary()
    assert tok.first_id == rows == 151_936 and tok.vocab_size == rows + len(vocabulary)
    assert model.get_input_embeddings().num_embeddings == tok.vocab_size
    assert model.get_output_embeddings().weight.shape[0] == tok.vocab_size
    weight = model.get_input_embeddings().weight.detach()
    old, new = weight[:rows], weight[rows:]
    assert torch.isfinite(new).all() and len(torch.unique(new, dim=0)) == len(new)  # distinct codes
    z = (new - old.mean(0)) / old.std(0)  # N(0, 1) if drawn on the old rows' scale, per dimension
    assert abs(float(z.mean())) < 4 / z.numel() ** 0.5 and abs(float(z.std()) - 1) < 0.1
    assert model(torch.tensor([tok.encode(ids.text(0))])).logits.shape == (1, LEVELS + 1, tok.vocab_size)
    assert tok.name == base.name + " + semantic IDs" and tok.special_ids == base.special_ids


def test_code_tokenizer_encodes_codes_as_single_tokens(embedded):
    _, base, ids, tok, rows = embedded
    assert tok.encode("Hello <a_1><b_2>") == base.encode("Hello ") + [rows + 1, rows + CODEBOOK + 2]
    assert tok.encode("x<z_99>y<a_99>") == base.encode("x<z_99>y<a_99>")  # not in the vocabulary: plain text
    for text in ids.texts() + ["Watch <c_7> next\n", "<a_0>Heat (1995)<a_0>"]:
        assert tok.decode(tok.encode(text)) == text
    encoded = [tok.encode(text) for text in ids.texts()]
    assert all(len(item) == LEVELS + 1 and min(item) >= rows for item in encoded)
    trie = flowkern.Trie.build(encoded, np.ones(len(encoded)), eos_token_id=tok.encode("\n")[0])
    assert trie.num_items == len(TITLES)


def test_load_model_reads_the_code_tokens_back(embedded, tmp_path):
    model, _, ids, tok, rows = embedded
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    reloaded = load_model(str(tmp_path), seed=0)
    assert isinstance(reloaded.tokenizer, CodeTokenizer) and reloaded.tokenizer.first_id == rows
    assert [reloaded.tokenizer.decode(tok.encode(text)) for text in ids.texts()] == ids.texts()
    assert reloaded.model.get_input_embeddings().num_embeddings == tok.vocab_size
    ids.save(tmp_path)  # without first_id the ids of the code tokens are unknown
    with pytest.raises(DataError, match=re.escape(os.path.join(tmp_path, FILE))):
        load_model(str(tmp_path), seed=0)
