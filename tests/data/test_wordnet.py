import numpy as np
import pytest

from leanscale.core.errors import DataNotFoundError, InvalidParameterError
from leanscale.data import (
    LEXICOGRAPHER_FILES,
    WORDNET_N_GLOSSES,
    DataFormatError,
    load_wordnet_glosses,
    train_test_split,
)
from leanscale.data.wordnet import parse_data_line

HEADER = "  1 This software and database is being provided to you, the LICENSEE, by  \n  2 Princeton  \n"
NOUN = (
    "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 ~ 00002137 n 0000 ~ 04431553 n 0000 "
    "| that which is perceived or known or inferred to have its own distinct existence  \n"
    "00074790 04 n 0b blunder 0 blooper 0 bloomer 0 bungle 0 pratfall 0 foul-up 0 fuckup 0 flub 0 "
    "botch 0 boner 0 boo-boo 0 001 @ 00070965 n 0000 | an embarrassing mistake  \n"
)
VERB = (
    "00001740 29 v 04 breathe 0 take_a_breath 0 respire 0 suspire 3 002 * 00005041 v 0000 "
    "^ 00004227 v 0103 02 + 02 00 + 08 00 | draw air into, and expel out of, the lungs; "
    '"I can breathe better when the air is clean"  \n'
)
ADJ = (
    "00020103 00 s 02 outback(a) 0 remote 0 001 & 00019874 a 0000 | inaccessible and sparsely "
    "populated;  \n"
)
ADV = '00001740 02 r 01 a_cappella 0 000 | without musical accompaniment; "they performed a cappella"  \n'


def _write_root(tmp_path, noun=NOUN):
    for pos, body in (("noun", noun), ("verb", VERB), ("adj", ADJ), ("adv", ADV)):
        (tmp_path / f"data.{pos}").write_text(HEADER + body, encoding="utf-8")
    return tmp_path


def test_label_names_are_the_45_lexicographer_files():
    assert len(LEXICOGRAPHER_FILES) == 45 == len(set(LEXICOGRAPHER_FILES))
    assert LEXICOGRAPHER_FILES[:4] == ("adj.all", "adj.pert", "adv.all", "noun.Tops")
    assert LEXICOGRAPHER_FILES[28] == "noun.time" and LEXICOGRAPHER_FILES[29] == "verb.body"
    assert LEXICOGRAPHER_FILES[43] == "verb.weather" and LEXICOGRAPHER_FILES[44] == "adj.ppl"


def test_parse_hex_word_count_pointers_and_verb_frames():
    off, lex, ss, words, gloss = parse_data_line(NOUN.splitlines()[1])
    assert (off, lex, ss) == (74790, 4, "n") and len(words) == 11  # w_cnt "0b" is hexadecimal
    assert words[-1] == "boo-boo" and gloss == "an embarrassing mistake"
    off, lex, ss, words, gloss = parse_data_line(VERB)
    assert (lex, ss, words) == (29, "v", ("breathe", "take a breath", "respire", "suspire"))
    assert gloss.startswith("draw air into, and expel out of, the lungs;") and gloss.endswith('clean"')
    assert parse_data_line(ADJ)[3] == ("outback", "remote")  # "(a)" marker removed


@pytest.mark.parametrize(
    "line, match",
    [
        ("00001740 03 n 01 entity 0 003 ~ 00001930 n 0000", "no '|'"),
        ("00001740 03 n 02 entity 0 000 | gloss", "malformed synset fields|expected"),
        ("00001740 03 n 01 entity 0 001 ~ 00001930 n 0000 extra | gloss",
         "expected 11 fields before the gloss, found 12"),
        ("00001740 77 n 01 entity 0 000 | gloss", "lex_filenum 77"),
        ("0000174x 03 n 01 entity 0 000 | gloss", "malformed"),
    ],
)
def test_parse_rejects_malformed_lines(line, match):
    with pytest.raises(DataFormatError, match=match):
        parse_data_line(line)


def test_load_from_user_root(tmp_path):
    g = load_wordnet_glosses(_write_root(tmp_path), include_words=True)
    assert len(g) == 5 and g.label_names == LEXICOGRAPHER_FILES
    assert g.labels.dtype == np.int64 and g.labels.tolist() == [3, 4, 29, 0, 2]
    assert g.pos.tolist() == ["noun", "noun", "verb", "adj", "adv"]
    assert g.offsets.tolist() == [1740, 74790, 1740, 20103, 1740]
    assert g.words[0] == ("entity",) and g.words[4] == ("a cappella",)
    assert g.texts[4] == 'without musical accompaniment; "they performed a cappella"'
    assert load_wordnet_glosses(tmp_path).words is None


def test_pos_subset_and_order(tmp_path):
    g = load_wordnet_glosses(_write_root(tmp_path), pos=("adv", "noun"))
    assert g.pos.tolist() == ["adv", "noun", "noun"]
    assert load_wordnet_glosses(tmp_path, pos="verb").labels.tolist() == [29]


def test_bad_pos(tmp_path):
    _write_root(tmp_path)
    valid = r"'pos'.*'adj', 'adv', 'noun', 'verb'.*Did you mean 'noun'"
    with pytest.raises(InvalidParameterError, match=valid):
        load_wordnet_glosses(tmp_path, pos=("nouns",))
    with pytest.raises(InvalidParameterError, match="at least one"):
        load_wordnet_glosses(tmp_path, pos=())
    with pytest.raises(InvalidParameterError, match="must not repeat"):
        load_wordnet_glosses(tmp_path, pos=("noun", "noun"))


def test_malformed_file_names_file_and_line(tmp_path):
    _write_root(tmp_path, noun=NOUN + "00001740 03 n 01 entity 0 003 | truncated pointers\n")
    with pytest.raises(DataFormatError, match=r"data\.noun:5: "):
        load_wordnet_glosses(tmp_path)


def test_wrong_ss_type_in_file(tmp_path):
    _write_root(tmp_path, noun=VERB)
    with pytest.raises(DataFormatError, match=r"ss_type 'v' does not belong in data.noun"):
        load_wordnet_glosses(tmp_path)


def test_missing_wordnet_says_how_to_install(tmp_path):
    with pytest.raises(DataNotFoundError, match="sudo apt-get install wordnet-base"):
        load_wordnet_glosses(tmp_path)


@pytest.mark.requires_data("wordnet")
def test_installed_wordnet_has_117659_glosses_in_45_classes():
    g = load_wordnet_glosses(include_words=True)
    assert len(g) == WORDNET_N_GLOSSES == 117_659
    assert len(g.texts) == len(g.labels) == len(g.pos) == len(g.offsets) == len(g.words)
    assert np.unique(g.labels).tolist() == list(range(45))
    counts = {p: int((g.pos == p).sum()) for p in ("noun", "verb", "adj", "adv")}
    assert counts == {"noun": 82_115, "verb": 13_767, "adj": 18_156, "adv": 3_621}
    # the first noun synset is 'entity', in noun.Tops (lex_filenum 03)
    assert g.words[0] == ("entity",) and g.offsets[0] == 1740
    assert g.label_names[g.labels[0]] == "noun.Tops" and g.labels[0] == 3
    assert g.texts[0].startswith("that which is perceived or known or inferred")
    assert all(t and t == t.strip() for t in g.texts)
    # every part of speech only uses its own lexicographer files
    names = np.asarray(g.label_names)[g.labels]
    for p in ("noun", "verb", "adv"):
        assert all(n.startswith(p + ".") for n in names[g.pos == p])
    assert all(n.startswith("adj.") for n in names[g.pos == "adj"])


def test_train_test_split_is_stratified_deterministic_partition():
    labels = np.repeat(np.arange(5), [100, 50, 20, 9, 1])
    tr, te = train_test_split(labels, test_fraction=0.2, seed=0)
    assert len(te) == 36 and len(tr) + len(te) == len(labels)
    assert np.array_equal(np.sort(np.concatenate([tr, te])), np.arange(len(labels)))
    assert np.bincount(labels[te], minlength=5).tolist() == [20, 10, 4, 2, 0]
    tr2, te2 = train_test_split(labels, test_fraction=0.2, seed=0)
    assert np.array_equal(te, te2) and np.array_equal(tr, tr2)
    assert not np.array_equal(te, train_test_split(labels, 0.2, seed=1)[1])
    with pytest.raises(InvalidParameterError, match=r"'test_fraction'.*range \(0, 1\)"):
        train_test_split(labels, test_fraction=1.0)
