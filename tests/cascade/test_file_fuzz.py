"""Fuzz every kind of saved cascade file (issue #13): seeded mutations of a cascade JSON (rules,
TF-IDF and embedding-head stages), of its arrays files, of a saved Router and of mined rules.
Only leanscale errors may escape loading (each naming what is wrong), no pickle is ever touched,
and whatever loads also predicts without a raw exception."""

from __future__ import annotations

import copy
import json
import random
import shutil

import numpy as np
import pytest

from leanscale.cascade import (
    Cascade,
    EmbeddingClassifier,
    ModelStage,
    RegexStage,
    Router,
    TfidfClassifier,
    mine_rules,
)
from leanscale.cascade.rules import MinedRules
from leanscale.core.errors import LeanscaleError

WORDS = {"billing": ["refund", "invoice"], "tech": ["crash", "error"], "sales": ["price", "quote"]}
FILLER = ["please", "help", "my", "account", "today", "thanks", "order", "team"]
PROBE = ["refund please", "crash now", "price of it", "\ud800 odd", ""]


def make_data(n=150, seed=0):
    rng = random.Random(seed)
    X, y = [], []
    for i in range(n):
        lab = list(WORDS)[i % 3]
        words = rng.sample(FILLER, 3) + [rng.choice(WORDS[lab])]
        rng.shuffle(words)
        X.append(" ".join(words))
        y.append(lab)
    return X, np.array(y, dtype=object)


def embed(texts):
    out = np.zeros((len(texts), 6), dtype=np.float32)
    for i, t in enumerate(texts):
        for w in t.split():
            out[i, sum(map(ord, w)) % 6] += 1.0
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    X, y = make_data()
    tfidf = TfidfClassifier(min_df=1).fit(X[:100], y[:100])
    emb = EmbeddingClassifier(encoder=embed, hidden=3, epochs=2).fit(X[:100], y[:100])
    stages = [RegexStage([(r"\brefund\b", "billing"), (r"\bcrash\b", "tech")], name="rules", cost=0.001),
              ModelStage(tfidf, name="tfidf", cost=0.05), ModelStage(emb, name="emb", cost=1.0)]
    cascade = Cascade(stages).fit(X[100:], y[100:])
    emb.encoder = None
    path = cascade.save(root / "c" / "cascade.json")
    outcomes = {"weak": np.array([i % 3 != 0 for i in range(150)]), "strong": np.ones(150, dtype=bool)}
    router = Router(max_features=200).fit(X, outcomes, costs={"weak": 1.0, "strong": 10.0})
    router_dir = router.save(root / "router")
    rules = mine_rules(X, y, min_precision=0.5, min_support=3)
    assert len(rules) > 0
    return {"root": root, "cascade": path, "router": router_dir, "rules": rules.to_dict()}


@pytest.fixture(autouse=True)
def no_pickle(monkeypatch):
    import pickle

    import torch

    def forbidden(*a, **k):
        raise AssertionError("pickle/torch.load used while loading an untrusted file")

    for mod, name in ((pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(mod, name, forbidden)


# ------------------------------------------------------------------------------ mutations

POOL = [None, True, False, -1, 0, 1, 2.5, -1e300, 1e308, 10**12, -(10**12), 2**64, "", "x", "../../etc/passwd",
        "/etc/passwd", r"(?:\w+)+#", [], {}, [[1, 2]], {"a": 1}, [None], "NaN", float("nan"), float("inf")]


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node[:6]):  # the first few items of long lists (vocabularies)
            yield from _paths(v, prefix + (i,))


def mutate_tree(doc, rng):
    doc = copy.deepcopy(doc)
    paths = [p for p in _paths(doc) if p]
    path = rng.choice(paths)
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    key = path[-1]
    op = rng.randrange(5)
    if op == 0:  # delete
        del parent[key]
    elif op == 1:  # another type / a huge or negative number / a path
        parent[key] = copy.deepcopy(rng.choice(POOL))
    elif op == 2:  # wrong nesting
        parent[key] = [parent[key]] if rng.random() < 0.5 else {"value": parent[key]}
    elif op == 3 and isinstance(parent[key], (int, float)) and not isinstance(parent[key], bool):
        parent[key] = rng.choice([-parent[key], parent[key] * 10**9, parent[key] + 1, -1])
    elif isinstance(parent[key], list) and parent[key]:
        parent[key] = parent[key][: rng.randrange(len(parent[key]))] + parent[key][:1] * rng.randrange(2)
    else:
        parent[key] = copy.deepcopy(rng.choice(POOL))
    return doc


def mutate_bytes(data: bytes, rng) -> bytes:
    op = rng.randrange(4)
    if op == 0:
        return data[: rng.randrange(len(data))]  # truncated
    if op == 1:
        b = bytearray(data)
        for _ in range(rng.randrange(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b)
    if op == 2:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200)))
    return b"PK\x03\x04" + data[4:] if rng.random() < 0.5 else b""


def _use(obj, kind):
    """What a caller does with a loaded object: it must not raise a raw exception."""
    try:
        if kind == "cascade":
            out = obj.predict_detailed(PROBE)
            assert len(out.labels) == len(PROBE)
            obj.explain()
        elif kind == "router":
            obj.predict_gain(PROBE[:3])
            obj.route(PROBE[:3], strong_fraction=0.5)
        else:
            obj.to_stage().predict(PROBE)
            obj.explain()
    except LeanscaleError:
        pass


def _load_expecting_only_leanscale_errors(load, kind, what):
    try:
        obj = load()
    except LeanscaleError as exc:
        assert str(exc), what
        return "refused"
    _use(obj, kind)
    return "loaded"


# ---------------------------------------------------------------------------------- tests


def test_mutated_cascade_json(saved, tmp_path):
    rng = random.Random(13)
    src = saved["cascade"].parent
    good = json.loads(saved["cascade"].read_text())
    outcomes = {"refused": 0, "loaded": 0}
    work = tmp_path / "c"
    shutil.copytree(src, work)
    target = work / "cascade.json"
    for i in range(160):
        if i % 4 == 3:
            target.write_bytes(mutate_bytes(saved["cascade"].read_bytes(), rng))
        else:
            target.write_text(json.dumps(mutate_tree(good, rng)))
        outcomes[_load_expecting_only_leanscale_errors(lambda: Cascade.load(target), "cascade", i)] += 1
    assert outcomes["refused"] > 60 and outcomes["loaded"] > 5, outcomes


def test_mutated_arrays_files(saved, tmp_path):
    rng = random.Random(7)
    work = tmp_path / "c"
    shutil.copytree(saved["cascade"].parent, work)
    doc = json.loads((work / "cascade.json").read_text())
    names = [d["model"]["arrays"] for d in doc["stages"] if isinstance(d.get("model"), dict)]
    assert len(names) == 2
    for i in range(40):
        name = names[i % 2]
        original = (saved["cascade"].parent / name).read_bytes()
        (work / name).write_bytes(mutate_bytes(original, rng))
        if i % 3 == 0:  # and without the hash check: the arrays themselves are checked too
            d = copy.deepcopy(doc)
            for s in d["stages"]:
                if isinstance(s.get("model"), dict):
                    s["model"].pop("sha256")
            (work / "cascade.json").write_text(json.dumps(d))
        else:
            (work / "cascade.json").write_text(json.dumps(doc))
        result = _load_expecting_only_leanscale_errors(lambda: Cascade.load(work / "cascade.json"), "cascade", i)
        if i % 3:  # with the recorded sha256 any change is refused; without, only what breaks the format
            assert result == "refused", i
        (work / name).write_bytes(original)


def test_mutated_router_saves(saved, tmp_path):
    rng = random.Random(5)
    good = json.loads((saved["router"] / "meta.json").read_text())
    outcomes = {"refused": 0, "loaded": 0}
    for i in range(60):
        work = tmp_path / f"r{i}"
        shutil.copytree(saved["router"], work)
        if i % 5 == 4:
            arrays = work / good["arrays_file"]
            arrays.write_bytes(mutate_bytes(arrays.read_bytes(), rng))
        elif i % 5 == 3:
            (work / "meta.json").write_bytes(mutate_bytes((work / "meta.json").read_bytes(), rng))
        else:
            (work / "meta.json").write_text(json.dumps(mutate_tree(good, rng)))
        outcomes[_load_expecting_only_leanscale_errors(lambda: Router.load(work), "router", i)] += 1
    assert outcomes["refused"] > 20, outcomes


def test_mutated_mined_rules(saved):
    rng = random.Random(3)
    for i in range(50):
        doc = json.loads(json.dumps(mutate_tree(saved["rules"], rng)))
        _load_expecting_only_leanscale_errors(lambda: MinedRules.from_dict(doc), "rules", i)
