"""Issue #13 for cascades: bad inputs get a clear error, files are untrusted (patterns on RE2,
sizes checked before allocation, arrays inside the folder, content hashes), multi-file saves are
atomic as a whole, and one bad text never fails its batch."""

from __future__ import annotations

import json
import re
import sys
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from leanscale.cascade import (
    CallableStage,
    Cascade,
    EmbeddingClassifier,
    ModelStage,
    RegexStage,
    Router,
    TfidfClassifier,
)
from leanscale.cascade._shared import DEFAULT_TOKEN_PATTERN
from leanscale.core import persistence
from leanscale.core.errors import DataFormatError, InvalidParameterError, LeanscaleError

WORDS = {"billing": ["refund", "invoice", "charge"], "tech": ["crash", "error", "bug"],
         "sales": ["price", "quote", "discount"]}
FILLER = ["please", "help", "my", "account", "today", "thanks", "order", "team", "now", "café", "naïve", "日本"]


def make_data(n=240, seed=0):
    rng = np.random.default_rng(seed)
    labels = list(WORDS)
    X, y = [], []
    for i in range(n):
        lab = labels[i % 3]
        words = list(rng.choice(FILLER, 4))
        if rng.random() < 0.8:
            words.insert(int(rng.integers(0, 5)), str(rng.choice(WORDS[lab])))
        X.append(" ".join(words))
        y.append(lab)
    return X, np.array(y, dtype=object)


def embed(texts):  # a deterministic stand-in encoder (8-d bag of hashed words)
    out = np.zeros((len(texts), 8), dtype=np.float32)
    for i, t in enumerate(texts):
        for w in t.split():
            out[i, sum(map(ord, w)) % 8] += 1.0
    return out


def fit_cascade(seed=0, with_embedding=False):
    X, y = make_data(seed=seed)
    tfidf = TfidfClassifier(min_df=1, seed=seed).fit(X[:160], y[:160])
    stages = [RegexStage([(r"\brefund\b", "billing"), (r"\bcrash\b", "tech")], name="rules", cost=0.001),
              ModelStage(tfidf, name="tfidf", cost=0.05)]
    if with_embedding:
        emb = EmbeddingClassifier(encoder=embed, hidden=4, epochs=2, seed=seed).fit(X[:160], y[:160])
        stages.append(ModelStage(emb, name="emb", cost=1.0))
    c = Cascade(stages).fit(X[160:], y[160:])
    for s in stages:
        if isinstance(getattr(s, "model", None), EmbeddingClassifier):
            s.model.encoder = None  # a callable cannot be saved; the loaded stage fails and falls back
    return c, X, y


@pytest.fixture(scope="module")
def fitted():
    return fit_cascade()


# ---------------------------------------------------------------------------------- bad inputs


def test_predict_refuses_a_bare_string(fitted):
    c, X, _ = fitted
    for call in (c.predict, c.predict_detailed):
        with pytest.raises(InvalidParameterError, match=r"'X' parameter of Cascade.predict must be a list of "
                                                        r"requests, e.g. \['refund please'\].*one request per character"):
            call("refund please")
    with pytest.raises(InvalidParameterError, match="'X' parameter of Cascade.predict.*Got dict"):
        c.predict({"a": 1})
    assert len(c.predict(["refund please"])) == 1
    with pytest.raises(InvalidParameterError, match="'X' parameter of Cascade.score.*single str"):
        c.score("refund please", ["billing"])


@pytest.mark.parametrize("bad, match", [
    (lambda y: [None] + list(y[1:]), r"'y' parameter of Cascade.fit must not contain missing labels.*None at index 0"),
    (lambda y: list(y[:5]) + [float("nan")] + list(y[6:]), r"missing labels.*nan at index 5"),
    (lambda y: list(y[:3]) + [["billing"]] + list(y[4:]), r"hashable labels.*list \['billing'\] at index 3"),
    (lambda y: "billing" * 10, r"'y' parameter of Cascade.fit must be a list of labels.*Got str"),
])
def test_fit_refuses_missing_and_malformed_labels(bad, match):
    X, y = make_data(n=70)
    stages = [RegexStage([(r"\brefund\b", "billing")], name="rules", cost=0.001),
              CallableStage(lambda t: ("tech", 0.5), name="big", cost=1.0)]
    with pytest.raises(InvalidParameterError, match=match):
        Cascade(stages).fit(X, bad(y))
    with pytest.raises(InvalidParameterError, match="'X' parameter of Cascade.fit.*single str"):
        Cascade(stages).fit("refund please", ["billing"] * 13)


def test_one_lone_surrogate_does_not_fail_the_batch(fitted):
    c, X, _ = fitted
    texts = ["refund please", "crash \ud800 again", "\udfff", "price quote"]
    out = c.predict_detailed(texts)
    assert out.errors == {}
    assert out.stage[0] == "rules" and out.labels[0] == "billing"
    assert out.stage[1] == "rules" and out.labels[1] == "tech"  # the rest of the text still matches
    ref = c.predict_detailed([texts[3]])
    assert out.labels[3] == ref.labels[0] and out.confidence[3] == ref.confidence[0]


# ------------------------------------------------------------------------- TF-IDF token pattern


def test_loaded_tfidf_uses_the_vetted_constant_pattern_and_predicts_the_same(tmp_path, fitted):
    from sklearn.feature_extraction.text import TfidfVectorizer

    c, X, _ = fitted
    clf = c.stages[1].model
    assert TfidfVectorizer().token_pattern == DEFAULT_TOKEN_PATTERN
    loaded = TfidfClassifier.load(clf.save(tmp_path / "m"))
    assert loaded.vectorizer_.token_pattern is DEFAULT_TOKEN_PATTERN  # leanscale's constant, not the file's
    probe = X + ["Café RÉFUND naïve", "日本 crash!!", "x", "", "über-price_quote 42", "a\ud800b"]
    np.testing.assert_array_equal(loaded.predict_proba(probe), clf.predict_proba(probe))


def test_the_default_pattern_is_linear_on_adversarial_requests(tmp_path, fitted):
    c, _, _ = fitted
    loaded = TfidfClassifier.load(c.stages[1].model.save(tmp_path / "m"))
    for n in (20_000, 200_000):
        texts = ["a" * n + "#", "a b " * (n // 4) + "#", "_" * n, ("é" * 3 + " ") * (n // 4)]
        t0 = time.perf_counter()
        loaded.predict_proba(texts)
        elapsed = time.perf_counter() - t0
        if n == 20_000:
            small = elapsed
    assert elapsed < 20 * small + 0.5  # 10x the input: ~10x the time, not exponential


def test_a_crafted_token_pattern_is_refused_at_load(tmp_path, fitted):
    c, X, _ = fitted
    path = c.save(tmp_path / "c.json")
    doc = json.loads(path.read_text())
    doc["stages"][1]["model"]["meta"]["tfidf"]["token_pattern"] = r"(?:\w+)+#"
    path.write_text(json.dumps(doc))
    t0 = time.perf_counter()
    with pytest.raises(DataFormatError, match=r"c.json.*token_pattern '\(\?:\\\\w\+\)\+#'.*only scikit-learn's default"):
        Cascade.load(path)
    assert time.perf_counter() - t0 < 5
    for pattern in (r"\w+", "(?u)\\b\\w\\w+\\b ", None, 7):  # anything but the exact default
        doc["stages"][1]["model"]["meta"]["tfidf"]["token_pattern"] = pattern
        path.write_text(json.dumps(doc))
        with pytest.raises(DataFormatError, match="token_pattern"):
            Cascade.load(path)


# ------------------------------------------------------------------------------ regex stages


@pytest.mark.parametrize("pattern", [r"(a|aa)+$", r"(a|a)+$", r"((a+))+$", r"(?:\w+)+#"])
def test_re_engine_refuses_the_bypasses_of_the_backtracking_check(pattern):
    with pytest.raises(InvalidParameterError, match=re.escape(repr(pattern))):
        RegexStage([(pattern, 1)], engine="re")
    stage = RegexStage([(pattern, 1)])  # RE2 runs them in linear time
    t0 = time.perf_counter()
    stage.predict(["a" * 5000 + "!", "w" * 40 + "!"])
    assert time.perf_counter() - t0 < 2


_ATOMS = st.sampled_from(["a", "aa", r"\w", "[ab]", ".", "b"])


@st.composite
def patterns(draw, depth=2):
    parts = []
    for _ in range(draw(st.integers(1, 3))):
        if depth and draw(st.booleans()):
            inner = draw(patterns(depth - 1))
            if draw(st.booleans()):
                inner = inner + "|" + draw(patterns(depth - 1))
            atom = "(?:" + inner + ")"
        else:
            atom = draw(_ATOMS)
        parts.append(atom + draw(st.sampled_from(["", "", "*", "+", "?", "{2,}"])))
    return "".join(parts)


def _n_quantifiers(pattern: str) -> int:
    return (pattern.count("*") + pattern.count("+") + pattern.count("{2,}")
            + pattern.count("?") - pattern.count("(?:"))


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(patterns())
def test_patterns_passing_the_check_do_not_backtrack_exponentially(pattern):
    """Any pattern check_regex_safety accepts runs on Python's backtracking re without exponential
    blow-up: on adversarial inputs of length 22 (where an exponential pattern takes ~2**22 steps,
    seconds) it stays under a bound. Patterns have at most 3 quantifiers, so a polynomial one is at
    most ~n**3 (the engine's real time limit, the regex package, covers polynomial blow-ups)."""
    from leanscale.cascade.stages import _unsafe_reason

    assume(_n_quantifiers(pattern) <= 3)
    if _unsafe_reason(pattern) is not None:
        return
    rx = re.compile(pattern + "$")
    t0 = time.perf_counter()
    for text in ("a" * 22 + "!", "ab" * 11 + "!", "a" * 21 + "b!"):
        rx.search(text)
    assert time.perf_counter() - t0 < 1.0, pattern


def test_the_adversarial_inputs_do_expose_exponential_patterns():
    # the inputs above are adversarial: a pattern the check refuses is slow on them
    from leanscale.cascade.stages import _unsafe_reason

    assert _unsafe_reason("(?:a|aa)+") is not None
    t0 = time.perf_counter()
    re.compile("(?:a|aa)+$").search("a" * 22 + "!")
    assert time.perf_counter() - t0 > 0.002  # ~30,000 steps already at n = 22 (Fibonacci growth)


def test_re_engine_without_a_time_limit_is_refused_for_any_pattern(monkeypatch):
    import leanscale.cascade.stages as stages_mod

    monkeypatch.setattr(stages_mod, "_regex_module", lambda: None)

    @settings(max_examples=25, deadline=None)
    @given(patterns())
    def check(pattern):
        with pytest.raises(InvalidParameterError, match="'regex' package"):
            RegexStage([(pattern, 1)], engine="re")

    check()


# ------------------------------------------------------------------- sizes, paths and hashes


def test_huge_sizes_in_a_3kb_file_are_refused_before_allocation(tmp_path):
    c, X, _ = fit_cascade(with_embedding=True)
    path = c.save(tmp_path / "c.json")
    good = json.loads(path.read_text())
    import tracemalloc

    for field, value in (("hidden", 10**6), ("n_features_in", 50_000), ("hidden", 10**9)):
        doc = json.loads(json.dumps(good))
        meta = doc["stages"][2]["model"]["meta"]
        (meta["params"] if field == "hidden" else meta)[field] = value
        path.write_text(json.dumps(doc))
        tracemalloc.start()
        t0 = time.perf_counter()
        with pytest.raises(DataFormatError, match=r"c.json.*(hidden|n_features_in|shape)"):
            Cascade.load(path)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert time.perf_counter() - t0 < 2 and peak < 50 << 20, (field, value, peak)


@pytest.mark.parametrize("name", ["../outside.arrays", "/etc/passwd", "sub/../../outside.arrays", "", 7])
def test_arrays_files_must_lie_inside_the_cascade_folder(tmp_path, fitted, name):
    c, _, _ = fitted
    folder = tmp_path / "in"
    path = c.save(folder / "c.json")
    doc = json.loads(path.read_text())
    real = folder / doc["stages"][1]["model"]["arrays"]
    (tmp_path / "outside.arrays").write_bytes(real.read_bytes())  # a valid file, but outside
    doc["stages"][1]["model"]["arrays"] = name
    path.write_text(json.dumps(doc))
    with pytest.raises(DataFormatError, match="must lie inside the folder|must be a path relative|non-empty relative"):
        Cascade.load(path)


def test_symlink_out_of_the_folder_is_refused(tmp_path, fitted):
    c, _, _ = fitted
    path = c.save(tmp_path / "in" / "c.json")
    doc = json.loads(path.read_text())
    real = path.parent / doc["stages"][1]["model"]["arrays"]
    moved = tmp_path / "elsewhere.arrays"
    real.rename(moved)
    real.symlink_to(moved)
    with pytest.raises(DataFormatError, match="must lie inside the folder"):
        Cascade.load(path)


def test_a_changed_arrays_file_fails_its_hash(tmp_path, fitted):
    c, X, _ = fitted
    path = c.save(tmp_path / "c.json")
    other, _, _ = fit_cascade(seed=1)
    other_path = other.save(tmp_path / "other.json")
    doc = json.loads(path.read_text())
    mine = path.parent / doc["stages"][1]["model"]["arrays"]
    theirs = path.parent / json.loads(other_path.read_text())["stages"][1]["model"]["arrays"]
    mine.write_bytes(theirs.read_bytes())  # a valid arrays file of the same shapes? not the one saved
    with pytest.raises(DataFormatError, match="does not match the hash recorded"):
        Cascade.load(path)


# ------------------------------------------------------------------- atomic multi-file saves


def test_a_kill_between_arrays_and_json_keeps_the_previous_cascade(tmp_path, fitted, monkeypatch):
    c, X, _ = fitted
    path = c.save(tmp_path / "c.json")
    before = c.predict_detailed(X)
    files_before = sorted(p.name for p in tmp_path.iterdir())
    new, _, _ = fit_cascade(seed=1)
    import leanscale.cascade.cascade as cascade_mod

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cascade_mod, "atomic_write_json", killed)  # the arrays are written, the JSON is not
    with pytest.raises(KeyboardInterrupt):
        new.save(path)
    monkeypatch.undo()
    loaded = Cascade.load(path)
    after = loaded.predict_detailed(X)
    assert list(after.labels) == list(before.labels) and np.array_equal(after.confidence, before.confidence)
    # a completed save commits, then removes only the arrays the previous JSON named
    new.save(path)
    again = Cascade.load(path).predict_detailed(X)
    assert list(again.labels) == list(new.predict(X))
    names = {p.name for p in tmp_path.iterdir()}
    referenced = {d["model"]["arrays"] for d in json.loads(path.read_text())["stages"] if isinstance(d.get("model"), dict)}
    assert referenced <= names and not (set(files_before) - {"c.json"}) & names


def test_a_kill_during_a_router_save_keeps_the_previous_router(tmp_path, monkeypatch):
    X, y = make_data(n=120)
    outcomes = {"weak": np.array([i % 3 != 0 for i in range(120)]), "strong": np.ones(120, dtype=bool)}
    r1 = Router().fit(X, outcomes, costs={"weak": 1.0, "strong": 10.0})
    r2 = Router(C=0.01).fit(X, {"weak": ~outcomes["weak"], "strong": outcomes["strong"]},
                           costs={"weak": 1.0, "strong": 10.0})
    folder = r1.save(tmp_path / "router")
    monkeypatch.setattr(persistence, "atomic_write_json", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        r2.save(folder)
    monkeypatch.undo()
    np.testing.assert_array_equal(Router.load(folder).predict_gain(X), r1.predict_gain(X))
    r2.save(folder)
    np.testing.assert_array_equal(Router.load(folder).predict_gain(X), r2.predict_gain(X))
    assert len(list(folder.glob("arrays-*"))) == 1
    meta = json.loads((folder / "meta.json").read_text())
    meta["arrays_file"] = "../../etc/passwd"
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataFormatError, match="must lie inside the folder"):
        Router.load(folder)


def test_saved_model_errors_name_the_folder(tmp_path, fitted):
    c, _, _ = fitted
    folder = c.stages[1].model.save(tmp_path / "m")
    meta = json.loads((folder / "meta.json").read_text())
    meta["params"]["bogus"] = 1
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataFormatError, match=r"saved model '.*m' is invalid.*'bogus'"):
        TfidfClassifier.load(folder)
    with pytest.raises(LeanscaleError, match="meta.json is missing"):
        TfidfClassifier.load(tmp_path / "nothing")


def test_no_pickle_is_ever_loaded(tmp_path, fitted, monkeypatch):
    import pickle

    c, X, _ = fitted
    path = c.save(tmp_path / "c.json")

    def forbidden(*a, **k):
        raise AssertionError("pickle used while loading")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    assert list(Cascade.load(path).predict(X[:5])) == list(c.predict(X[:5]))


@pytest.mark.parametrize("content, match", [
    (b'{"format": "leanscale.cascade", "version": ' + b"1" * 5000 + b"}", "must be valid JSON.*4300 digits"),
    (b'{"format": "leanscale.cascade", "vers', "must be valid JSON"),
    (b"\xff\xfe", "must be UTF-8 JSON"),
    (b"[1, 2]", "not a saved leanscale cascade"),
    (b'{"format": "leanscale.cascade", "version": 1, "stages": []}', r"'stages' must be a list of 1 to 1,000 items"),
])
def test_malformed_cascade_files_name_the_file(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(DataFormatError, match=match) as info:
        Cascade.load(path)
    assert str(path) in str(info.value)


def test_a_missing_key_names_the_field(tmp_path, fitted):
    c, _, _ = fitted
    path = c.save(tmp_path / "c.json")
    doc = json.loads(path.read_text())
    del doc["costs"]["tfidf"]  # used to load and fail with KeyError at the first predict
    path.write_text(json.dumps(doc))
    with pytest.raises(DataFormatError, match=r"c.json' is invalid: 'costs' must be an object with exactly the keys "
                                              r"\['rules', 'tfidf'\]"):
        Cascade.load(path)
    doc = json.loads(c.save(path).read_text())
    doc["thresholds"] = {}  # used to load as "every stage off" silently
    path.write_text(json.dumps(doc))
    with pytest.raises(DataFormatError, match="'thresholds' must be an object with exactly the keys"):
        Cascade.load(path)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


def test_predict_warns_when_a_request_got_no_answer():
    """A None in predict's labels is not a prediction: it is said, and a fallback_label silences it."""
    from leanscale.cascade import RuleStage, UnansweredWarning

    rule = RuleStage(lambda t: "refund" if "refund" in t else None, name="rules", cost=1.0)
    X, y = ["refund me", "refund now", "hello", "refund pls"], ["refund", "refund", "other", "refund"]
    cascade = Cascade([rule]).fit(X, y)
    with pytest.warns(UnansweredWarning, match="1 of 2 requests got no answer from any stage"):
        labels = cascade.predict(["refund a", "hi"])
    assert list(labels) == ["refund", None]
    with_fallback = Cascade([rule], fallback_label="other").fit(X, y)
    assert list(with_fallback.predict(["refund a", "hi"])) == ["refund", "other"]  # no warning (errors)
