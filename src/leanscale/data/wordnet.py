"""WordNet 3.0 glosses labelled by lexicographer file: a 45-class text-classification set.

WordNet (Miller, 1995, "WordNet: a lexical database for English", CACM 38(11)) groups every
synset into one of 45 lexicographer files (``noun.animal``, ``verb.motion`` ...). Each synset has
a gloss (a definition, often followed by examples). Predicting the lexicographer file from the
gloss gives 117,659 labelled texts with a skewed class distribution, installed by the Debian
package ``wordnet-base`` in ``/usr/share/wordnet``.

Format of a line of ``data.{noun,verb,adj,adv}`` (wndb(5WN)); lines that begin with two spaces are
the license header::

    synset_offset lex_filenum ss_type w_cnt word lex_id [word lex_id...] p_cnt [ptr...] [frames...] | gloss

``w_cnt`` is a two-digit hexadecimal number, ``p_cnt`` a three-digit decimal one; each pointer has
four fields; verb synsets then have ``f_cnt`` and ``f_cnt`` frames of three fields.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leanscale.core.errors import InvalidParameterError
from leanscale.core.validation import Interval, check_param, unknown_name_error
from leanscale.data._sampling import stratified_indices
from leanscale.data.paths import DataFormatError, resolve_path

__all__ = [
    "LEXICOGRAPHER_FILES",
    "WORDNET_N_GLOSSES",
    "WordNetGlosses",
    "load_wordnet_glosses",
    "train_test_split",
]  # re-exported by leanscale.data; WORDNET_POS and parse_data_line are importable from here

# The 45 lexicographer files of WordNet 3.0, indexed by lex_filenum (lexnames(5WN)).
LEXICOGRAPHER_FILES: tuple[str, ...] = (
    "adj.all",  # 00 all adjective clusters
    "adj.pert",  # 01 relational adjectives (pertainyms)
    "adv.all",  # 02 all adverbs
    "noun.Tops",  # 03 unique beginner for nouns
    "noun.act",  # 04
    "noun.animal",  # 05
    "noun.artifact",  # 06
    "noun.attribute",  # 07
    "noun.body",  # 08
    "noun.cognition",  # 09
    "noun.communication",  # 10
    "noun.event",  # 11
    "noun.feeling",  # 12
    "noun.food",  # 13
    "noun.group",  # 14
    "noun.location",  # 15
    "noun.motive",  # 16
    "noun.object",  # 17
    "noun.person",  # 18
    "noun.phenomenon",  # 19
    "noun.plant",  # 20
    "noun.possession",  # 21
    "noun.process",  # 22
    "noun.quantity",  # 23
    "noun.relation",  # 24
    "noun.shape",  # 25
    "noun.state",  # 26
    "noun.substance",  # 27
    "noun.time",  # 28
    "verb.body",  # 29
    "verb.change",  # 30
    "verb.cognition",  # 31
    "verb.communication",  # 32
    "verb.competition",  # 33
    "verb.consumption",  # 34
    "verb.contact",  # 35
    "verb.creation",  # 36
    "verb.emotion",  # 37
    "verb.motion",  # 38
    "verb.perception",  # 39
    "verb.possession",  # 40
    "verb.social",  # 41
    "verb.stative",  # 42
    "verb.weather",  # 43
    "adj.ppl",  # 44 participial adjectives
)

# data file -> the ss_type letters its synsets may have ("s" = adjective satellite)
WORDNET_POS: dict[str, tuple[str, ...]] = {
    "noun": ("n",),
    "verb": ("v",),
    "adj": ("a", "s"),
    "adv": ("r",),
}

# Synsets in WordNet 3.0: 82,115 nouns + 13,767 verbs + 18,156 adjectives + 3,621 adverbs.
WORDNET_N_GLOSSES = 117_659

_SYNTACTIC_MARKERS = ("(a)", "(p)", "(ip)")  # adjective position markers glued to a word


@dataclass(frozen=True)
class WordNetGlosses:
    """Glosses of WordNet synsets with their lexicographer-file labels.

    Attributes:
        texts: the gloss of each synset (definition and examples, as in the file).
        labels: int64 array (n,), the lex_filenum 0..44, an index into ``label_names``.
        label_names: all 45 lexicographer file names (always all 45, so ids are stable).
        pos: array (n,) of the data file each synset came from (``"noun"``, ``"verb"``,
            ``"adj"``, ``"adv"``).
        offsets: int64 array (n,), the synset offset (unique within a data file).
        words: per synset, the tuple of its words (underscores as spaces, adjective markers
            removed) when ``include_words=True``; otherwise None.
    """

    texts: list[str]
    labels: np.ndarray
    label_names: tuple[str, ...]
    pos: np.ndarray
    offsets: np.ndarray
    words: list[tuple[str, ...]] | None = None

    def __len__(self) -> int:
        return len(self.texts)


def _clean_word(word: str) -> str:
    for marker in _SYNTACTIC_MARKERS:
        if word.endswith(marker):
            word = word[: -len(marker)]
            break
    return word.replace("_", " ")


def parse_data_line(line: str) -> tuple[int, int, str, tuple[str, ...], str]:
    """Parse one synset line of a WordNet data file.

    Returns:
        ``(offset, lex_filenum, ss_type, words, gloss)``.

    Raises:
        DataFormatError: the line does not follow wndb(5WN) (the caller adds file and line).

    Example:
        >>> parse_data_line("00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 "
        ...                 "~ 00002137 n 0000 ~ 04431553 n 0000 | that which is perceived  ")
        (1740, 3, 'n', ('entity',), 'that which is perceived')
    """
    head, bar, gloss = line.partition(" | ")
    if not bar:
        head, bar, gloss = line.rstrip("\n").partition("|")
        if not bar:
            raise DataFormatError("no '|' before the gloss")
    fields = head.split()
    try:
        offset = int(fields[0])
        lex_filenum = int(fields[1])
        ss_type = fields[2]
        w_cnt = int(fields[3], 16)  # hexadecimal
        words = tuple(_clean_word(fields[4 + 2 * i]) for i in range(w_cnt))
        p_at = 4 + 2 * w_cnt
        p_cnt = int(fields[p_at])  # decimal
        end = p_at + 1 + 4 * p_cnt
        if ss_type == "v" and end < len(fields):
            f_cnt = int(fields[end])
            end += 1 + 3 * f_cnt
    except (IndexError, ValueError) as exc:
        raise DataFormatError(f"malformed synset fields ({exc})") from None
    if end != len(fields):
        raise DataFormatError(f"expected {end} fields before the gloss, found {len(fields)}")
    if not 0 <= lex_filenum < len(LEXICOGRAPHER_FILES):
        raise DataFormatError(f"lex_filenum {lex_filenum} is not in 0..{len(LEXICOGRAPHER_FILES) - 1}")
    return offset, lex_filenum, ss_type, words, gloss.strip()


def _read_data_file(path: Path, pos: str, include_words: bool):
    offsets, labels, texts, words = [], [], [], []
    allowed = WORDNET_POS[pos]
    with open(path, encoding="utf-8", errors="strict") as fh:
        for lineno, line in enumerate(fh, start=1):
            if line.startswith("  ") or not line.strip():
                continue  # license header
            try:
                offset, lex, ss_type, ws, gloss = parse_data_line(line)
            except DataFormatError as exc:
                raise DataFormatError(f"{path}:{lineno}: {exc}") from None
            if ss_type not in allowed:
                raise DataFormatError(
                    f"{path}:{lineno}: ss_type {ss_type!r} does not belong in data.{pos} "
                    f"(expected {' or '.join(allowed)})"
                )
            offsets.append(offset)
            labels.append(lex)
            texts.append(gloss)
            if include_words:
                words.append(ws)
    return offsets, labels, texts, words


def load_wordnet_glosses(
    root: str | os.PathLike | None = None,
    pos: Sequence[str] | str = ("noun", "verb", "adj", "adv"),
    include_words: bool = False,
) -> WordNetGlosses:
    """Load the glosses of WordNet 3.0 labelled with their lexicographer file (45 classes).

    Args:
        root: folder with ``data.noun`` ... ``data.adv``; None searches ``$LEANSCALE_DATA_ROOT``
            and ``/usr/share/wordnet``.
        pos: which data files to read, in this order; any of ``"noun"``, ``"verb"``, ``"adj"``,
            ``"adv"`` (or one of them as a string).
        include_words: also return each synset's words.

    Returns:
        :class:`WordNetGlosses`; with all four parts of speech, 117,659 glosses in 45 classes.

    Raises:
        DataNotFoundError: WordNet is not installed there.
        DataFormatError: a data line is malformed (the message gives file and line).
        InvalidParameterError: an unknown part of speech.
    """
    if isinstance(pos, str):
        pos = (pos,)
    pos = tuple(pos)
    if not pos:
        raise InvalidParameterError(
            "The 'pos' parameter of load_wordnet_glosses must name at least one of "
            f"{', '.join(map(repr, WORDNET_POS))}. Got an empty sequence."
        )
    for p in pos:
        if p not in WORDNET_POS:
            raise unknown_name_error("pos", p, WORDNET_POS, owner="load_wordnet_glosses")
    if len(set(pos)) != len(pos):
        raise InvalidParameterError(
            f"The 'pos' parameter of load_wordnet_glosses must not repeat a part of speech. Got {pos!r}."
        )
    folder = resolve_path("wordnet", root, files=tuple(f"data.{p}" for p in pos))
    all_offsets, all_labels, all_texts, all_words, all_pos = [], [], [], [], []
    for p in pos:
        offsets, labels, texts, words = _read_data_file(folder / f"data.{p}", p, include_words)
        all_offsets += offsets
        all_labels += labels
        all_texts += texts
        all_words += words
        all_pos += [p] * len(texts)
    return WordNetGlosses(
        texts=all_texts,
        labels=np.asarray(all_labels, dtype=np.int64),
        label_names=LEXICOGRAPHER_FILES,
        pos=np.asarray(all_pos, dtype="<U4"),
        offsets=np.asarray(all_offsets, dtype=np.int64),
        words=all_words if include_words else None,
    )


def train_test_split(
    labels: Sequence[int] | np.ndarray, test_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, deterministic split of indices ``0..n-1`` into train and test.

    ``round(test_fraction * n)`` test items are spread over the classes in proportion to their
    sizes (largest-remainder rounding), so a class with one item usually lands in train.

    Args:
        labels: class of each item.
        test_fraction: share of items in the test set, in (0, 1).
        seed: the same ``(labels, test_fraction, seed)`` always gives the same split.

    Returns:
        ``(train_idx, test_idx)``: sorted int64 index arrays that partition ``0..n-1``.

    Example:
        >>> train_idx, test_idx = train_test_split([0, 0, 0, 0, 1, 1, 1, 1], 0.5, seed=0)
        >>> len(train_idx), len(test_idx)
        (4, 4)
    """
    check_param("test_fraction", test_fraction, [Interval(float, 0, 1, closed="neither")],
                owner="train_test_split")
    check_param("seed", seed, [Interval(int, 0, None)], owner="train_test_split")
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise InvalidParameterError(
            "The 'labels' parameter of train_test_split must be a non-empty 1-d sequence. "
            f"Got shape {labels.shape}."
        )
    n_test = int(round(test_fraction * labels.size))
    test_idx = stratified_indices(labels, n_test, seed).astype(np.int64)
    mask = np.ones(labels.size, dtype=bool)
    mask[test_idx] = False
    return np.flatnonzero(mask).astype(np.int64), test_idx
