"""``mechscope.partial``: a long job's finished pieces round-trip exactly, belong to one key, and
never outlive it."""

from __future__ import annotations

import json

import pytest
import torch

from mechscope.partial import Partial, clear


def test_pieces_round_trip_exactly_under_the_same_key(tmp_path):
    key = {"settings": {"n": 3, "x": 0.1}, "fingerprint": "v1:abc"}
    p = Partial(tmp_path, "job", key)
    assert p.found == 0 and not p.discarded and p.get("a") is None and p.get_tensors("t") is None
    value = {"floats": [0.1, 1 / 3, -2.5e-308, 1e300], "ids": [[1, 2], [3]], "none": None}
    t = torch.randn(4, 5) * 1e-3
    assert p.put("a", value) == value
    p.put_tensors("t", {"gains": t, "count": torch.arange(3)})
    q = Partial(tmp_path, "job", json.loads(json.dumps(key)))  # the key as another process builds it
    assert q.found == 2 and not q.discarded
    assert q.get("a") == value
    back = q.get_tensors("t")
    assert back is not None and torch.equal(back["gains"], t) and torch.equal(back["count"], torch.arange(3))
    assert not [f for f in tmp_path.rglob("*") if ".tmp" in f.name]


def test_another_key_discards_the_pieces_and_says_so(tmp_path):
    Partial(tmp_path, "job", {"n": 1}).put("a", 1)
    q = Partial(tmp_path, "job", {"n": 2})
    assert q.discarded and q.found == 0 and q.get("a") is None
    q.put("b", 2)
    r = Partial(tmp_path, "job", {"n": 1})  # the first key again: b was made under n=2
    assert r.discarded and r.get("b") is None and r.get("a") is None
    assert not Partial(tmp_path, "job", {"n": 1}).discarded  # an empty folder of the same key discards nothing


def test_jobs_are_apart_and_clear_removes_one(tmp_path):
    Partial(tmp_path, "one", {}).put("a", 1)
    Partial(tmp_path, "two", {}).put("a", 2)
    assert Partial(tmp_path, "one", {}).get("a") == 1 and Partial(tmp_path, "two", {}).get("a") == 2
    clear(tmp_path, "one")
    assert Partial(tmp_path, "one", {}).get("a") is None and Partial(tmp_path, "two", {}).get("a") == 2
    Partial(tmp_path, "two", {}).clear()
    assert not (tmp_path / "two-partial").exists()


def test_no_folder_keeps_nothing(tmp_path):
    p = Partial(None, "job", {})
    assert p.put("a", [1]) == [1] and p.get("a") is None
    p.put_tensors("t", {"x": torch.ones(2)})
    assert p.get_tensors("t") is None
    p.clear()


def test_damaged_pieces_are_done_again_and_bad_names_refused(tmp_path):
    p = Partial(tmp_path, "job", {})
    p.put("a", 1)
    p.put_tensors("t", {"x": torch.ones(2)})
    (tmp_path / "job-partial" / "a.json").write_text("{not json")
    (tmp_path / "job-partial" / "t.safetensors").write_bytes(b"\x00" * 5)
    assert p.get("a") is None and p.get_tensors("t") is None
    for bad in ("../x", "a b", "", "key"):
        with pytest.raises(ValueError):
            p.put(bad, 1)
    with pytest.raises(ValueError):
        Partial(tmp_path, "x/y", {})
    with pytest.raises(TypeError):  # not JSON: nothing is written
        p.put("c", object())
    assert not (tmp_path / "job-partial" / "c.json").exists()


def test_tensors_sharing_storage_are_stored(tmp_path):
    base = torch.arange(12.0).view(3, 4)
    p = Partial(tmp_path, "job", {})
    p.put_tensors("t", {"a": base[0], "b": base[1:], "c": base.T})
    back = Partial(tmp_path, "job", {}).get_tensors("t")
    assert back is not None and torch.equal(back["a"], base[0]) and torch.equal(back["c"], base.T)


def test_a_key_holding_other_objects_is_read_by_their_text(tmp_path):
    from pathlib import Path

    Partial(tmp_path, "job", {"text": Path("a/b.txt")}).put("a", 1)
    assert Partial(tmp_path, "job", {"text": "a/b.txt"}).get("a") == 1
    assert Partial(None, "job", {"text": Path("x"), "dtype": torch.float32}).get("a") is None  # no folder: never refused


def test_two_runs_writing_to_one_folder_are_refused(tmp_path):
    from mechscope.errors import MechscopeError

    a = Partial(tmp_path, "job", {"n": 1})
    a.put("x", 1)
    b = Partial(tmp_path, "job", {"n": 2})  # started on the same folder while a runs: a's pieces go
    b.put("y", 2)
    with pytest.raises(MechscopeError, match="Another run with other settings is writing to"):
        a.put("z", 3)
    assert Partial(tmp_path, "job", {"n": 1}).get("y") is None  # b's piece is never read as a's


def test_keys_read_tensors_sets_and_tuple_keys_by_content(tmp_path):
    import numpy as np

    t = torch.zeros(2000)
    u = t.clone()
    u[1000] = 1.0  # their text is the same ("...")
    Partial(tmp_path, "job", {"w": t, "s": {3, 1, 2}, (1, 2): "tuple key", "a": np.arange(3)}).put("x", 1)
    assert Partial(tmp_path, "job", {"w": t.clone(), "s": {2, 3, 1}, (1, 2): "tuple key", "a": np.arange(3)}).get("x") == 1
    assert Partial(tmp_path, "job", {"w": u, "s": {3, 1, 2}, (1, 2): "tuple key", "a": np.arange(3)}).get("x") is None


def test_digest_reads_tensors_of_any_dtype_by_content():
    from mechscope.partial import digest

    a = torch.arange(6, dtype=torch.bfloat16)
    assert digest([a, "x"]) == digest([a.clone(), "x"]) != digest([a + 1, "x"])
    assert digest(torch.zeros(3)) != digest(torch.zeros(3, dtype=torch.float64))
