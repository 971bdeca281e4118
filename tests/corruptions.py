"""Corrupted copies of a saved trie file, for Trie.load (tests/test_trie.py) and the count in
benchmarks/trie_corruptions.py.  Each case is (label, blamed, content): `content` is a dict
of arrays to write with np.savez, or the raw bytes of the file; `blamed` is the array whose
name a refusal must mention (None where the file is no archive of arrays at all)."""

import io
import zipfile

import numpy as np

import flowkern

SCALARS = ("format_version", "eos_token_id", "log_z")
ARRAYS = ("offsets", "tokens", "log_flow", "level_offsets", "leaf_nodes", "leaf_item_offsets", "leaf_items",
          "item_leaf", "item_rewards")
DTYPES = (np.int8, np.int16, np.int32, np.int64, np.uint64, np.float16, np.float32, np.float64, np.bool_)


def sample_trie():
    """A small trie with shared prefixes, a title that is a prefix of another and a duplicate title."""
    rng = np.random.default_rng(0)
    titles = [list(rng.integers(1, 9, size=rng.integers(1, 6))) for _ in range(24)]
    titles += [titles[0], titles[1][:1], titles[2] + [9]]
    return flowkern.Trie.build(titles, rng.uniform(0.5, 20.0, size=len(titles)), eos_token_id=0)


def saved_arrays(trie, directory) -> dict:
    trie.save(directory / "trie.npz")
    with np.load(directory / "trie.npz") as f:
        return {name: f[name] for name in f.files}


def corruptions(arrays: dict):
    """Every case, deterministic: dtypes, missing keys, shapes, single values, permutations,
    scalars and files that are not archives of arrays."""
    def changed(name, value):
        return dict(arrays, **{name: value})

    for name, value in arrays.items():
        for dtype in DTYPES:
            if np.dtype(dtype) != value.dtype:
                yield f"{name} as {np.dtype(dtype).name}", name, changed(name, value.astype(dtype))
        yield f"{name} missing", name, {k: v for k, v in arrays.items() if k != name}
        if name in SCALARS:
            yield f"{name} as a 1-element array", name, changed(name, value.reshape(1))
            continue
        yield f"{name} 2-D", name, changed(name, value[None])
        for label, part in (("without its last entry", value[:-1]), ("empty", value[:0]),
                            ("with its last entry repeated", np.append(value, value[-1:]))):
            yield f"{name} {label}", name, changed(name, part)
        for label, order in (("reversed", slice(None, None, -1)), ("rolled", np.roll(np.arange(value.size), 1)),
                             ("first two swapped", np.r_[1, 0, 2:value.size])):
            if not np.array_equal(value[order], value):
                yield f"{name} {label}", name, changed(name, value[order])
        big = np.iinfo(value.dtype).max if value.dtype.kind in "iu" else np.inf
        news = [lambda x: x + 1, lambda x: x - 1, lambda x: 0, lambda x: -1, lambda x: big]
        if value.dtype.kind == "f":
            news += [lambda x: np.nan, lambda x: -np.inf, lambda x: x * 2, lambda x: x + 1e-3]
        for position in sorted({0, 1, value.size // 2, value.size - 2, value.size - 1}):
            for index, new in enumerate(news):
                corrupt = value.copy()
                corrupt[position] = new(value[position])
                if not np.array_equal(corrupt, value, equal_nan=True):
                    yield f"{name}[{position}] change {index}", name, changed(name, corrupt)
    eos, tokens = int(arrays["eos_token_id"]), arrays["tokens"]
    for value in (eos + 1, eos - 1, int(tokens[0]), 2**31, -1):
        yield f"eos_token_id = {value}", "eos_token_id", changed("eos_token_id", np.int64(value))
    for value in (float(arrays["log_z"]) + 1, np.nan, np.inf):
        yield f"log_z = {value}", "log_z", changed("log_z", np.float64(value))
    for value in (0, 2, -1):
        yield f"format_version = {value}", "format_version", changed("format_version", np.int64(value))
    yield "tokens pickled", "tokens", changed("tokens", np.array([[1], "x"], dtype=object))
    yield from _raw_files(arrays)


def _raw_files(arrays):
    good = io.BytesIO()
    np.savez(good, **arrays)
    good = good.getvalue()
    npy = io.BytesIO()
    np.save(npy, arrays["tokens"])
    yield "a plain .npy", None, npy.getvalue()
    yield "random bytes", None, np.random.default_rng(1).bytes(len(good))
    yield "an empty file", None, b""
    compressed = io.BytesIO()
    np.savez_compressed(compressed, **arrays)
    yield "the archive compressed", "offsets", compressed.getvalue()
    yield "the archive cut in half", None, good[: len(good) // 2]
    yield "tokens declaring 2^40 entries", "tokens", _with_member(arrays, "tokens", _npy_header((2**40,), "<i4"))
    stored = arrays["tokens"]
    yield "tokens declaring more entries than stored", "tokens", _with_member(
        arrays, "tokens", _npy_header((stored.size + 5,), "<i4") + stored.tobytes())
    yield "log_flow with a header that is not a dict", "log_flow", _with_member(
        arrays, "log_flow", b"\x93NUMPY\x01\x00" + (118).to_bytes(2, "little") + b"[1, 2]".ljust(117) + b"\n")


def _npy_header(shape, descr) -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": descr, "fortran_order": False, "shape": shape})
    return out.getvalue()


def _with_member(arrays, name, raw) -> bytes:
    """The archive np.savez writes, with member `name` replaced by the bytes `raw`."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for key, value in arrays.items():
            member = io.BytesIO()
            np.save(member, value)
            archive.writestr(key + ".npy", raw if key == name else member.getvalue())
    return out.getvalue()


def write(path, content) -> None:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        with open(path, "wb") as f:
            np.savez(f, **content)


def rebuilt(trie):
    """Trie.build of the trie's own items (titles read back up from their leaves) and rewards."""
    offsets, tokens = trie.offsets.numpy(), trie.tokens.numpy()
    parent = np.repeat(np.arange(trie.num_nodes), np.diff(offsets))
    titles = []
    for leaf in trie.item_leaf.tolist():
        title, node = [], parent[leaf - 1]
        while node != 0 and len(title) < trie.num_nodes:
            title.append(int(tokens[node - 1]))
            node = parent[node - 1]
        titles.append(title[::-1])
    return flowkern.Trie.build(titles, trie.item_rewards.numpy(), eos_token_id=trie.eos_token_id)


def refusal(message: str, blamed) -> int:
    """0 if a refusal's message names the blamed array (or says a non-archive is none), 1 if
    it names another of the file's arrays, 2 if it names none."""
    if (blamed or "not a readable .npz archive") in message:
        return 0
    return 1 if any(f"{name} " in message for name in ARRAYS + SCALARS) else 2


def same_trie(a, b) -> bool:
    return (a.eos_token_id, a.log_z) == (b.eos_token_id, b.log_z) and all(
        x.dtype == y.dtype and x.shape == y.shape and bool((x == y).all())
        for x, y in ((getattr(a, name), getattr(b, name)) for name in ARRAYS))
