"""Text corpora, a cached byte-level BPE tokenizer, and single-epoch token streams.

Corpora (:data:`CORPORA`, or a path to your own text):

* ``"gcide"``: the GNU Collaborative International Dictionary of English, mostly Webster's
  Revised Unabridged Dictionary (1913), from the Debian package ``dict-gcide``
  (``/usr/share/dictd/gcide.dict.dz``, about 38 MB of text after cleaning).
* ``"stdlib"``: the CPython standard library sources of the running interpreter (all ``*.py``
  under ``sysconfig.get_paths()["stdlib"]``, about 34 MB on CPython 3.11).

The tokenizer is byte-level BPE (Sennrich, Haddow and Birch, 2016, arXiv:1508.07909, on bytes as in
GPT-2), trained with the ``tokenizers`` library; every text round-trips exactly through
``decode(encode(text))``. Tokenizers and encoded corpora are cached under
``cache_dir()/"tokenizers"``, keyed by the source, a fingerprint of its files, the byte limit and
the vocabulary size.

:class:`TokenStream` serves the training tokens for *single-epoch* training (Komatsuzaki, 2019,
"One Epoch Is All You Need", arXiv:1906.06669): every training token is an input exactly once, so
the loss on the training stream is an unbiased estimate of the loss on unseen text.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import re
import sysconfig
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from leanscale.core.errors import DataNotFoundError, InvalidParameterError, MissingDependencyError
from leanscale.core.io import atomic_write_bytes, atomic_write_text, read_npy
from leanscale.core.validation import Interval, check_param, unknown_name_error
from leanscale.data.paths import DATASETS, DataFormatError, cache_dir, find_file, resolve_path

__all__ = [
    "CORPORA",
    "DOCUMENT_SEPARATOR",
    "SPECIAL_TOKENS",
    "load_corpus",
    "corpus_cache_key",
    "train_bpe_tokenizer",
    "encode_text",
    "encode_corpus",
    "TokenStream",
    "TokenBatches",
]  # re-exported by leanscale.data; USER_TEXT_SUFFIXES and clean_gcide are importable from here

CORPORA: dict[str, str] = {
    "gcide": "Webster's Revised Unabridged Dictionary (1913) via GCIDE, Debian package dict-gcide",
    "stdlib": "CPython standard-library sources (*.py) of the running interpreter",
}

# Between two documents (files) of a corpus; one token of its own in the tokenizer (id 0).
DOCUMENT_SEPARATOR = "\n<|endoftext|>\n"
SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>",)
# Files taken from a user folder; hidden files and folders (".git") are skipped.
USER_TEXT_SUFFIXES: tuple[str, ...] = (".txt", ".py", ".md")

# Bump when the cleaning or concatenation rules change: it is part of every cache key.
_CORPUS_FORMAT = "corpus-v2"
_TOKENIZER_RECIPE = "bytelevel-bpe-v1"
_CHUNK_CHARS = 1 << 16  # ~64 KB of text per chunk given to the tokenizer
_CHUNKS_PER_BATCH = 64  # chunks per encode_batch call: ~4 MB, enough to keep every core busy
_READ_HINT = 1 << 22  # bytes of lines read at a time from gcide when streaming


# ----------------------------------------------------------------------------------------------
# Corpora
# ----------------------------------------------------------------------------------------------

# The source of a GCIDE paragraph: "[1913 Webster]", "[WordNet 1.5 +PJC]", "[Century Dict. 1906]"
# (about 90 spellings, 234,000 tags), but not an etymology such as "[L. See {Century}.]".
_TAG = r"\[(?![^\]\n]*\bSee\b)[^\]\n{}]*(?:Webster|WordNet|PJC|Century|RDH)[^\]\n{}]*\]"
_GCIDE_SOURCE_LINE = re.compile(rf"^[ \t]*{_TAG}[ \t]*\n", re.M)  # a line that is only a tag
_GCIDE_SOURCE_TAG = re.compile(rf"[ \t]*{_TAG}(?=[ \t]*$)|{_TAG}[ \t]*", re.M)  # a tag in a line
# The first dictionary entry: a headword line with its "\pro*nun`ci*a"tion\" in backslashes.
_GCIDE_FIRST_ENTRY = re.compile(r"^[^\s\\][^\n]*?\\[^\n]*?\\", re.M)


def clean_gcide(text: str, *, first_block: bool = True) -> str:
    r"""Lightly clean GCIDE text (line-based, so blocks of whole lines can be cleaned separately).

    * drops the dictd preamble (the ``00-database-*`` entries and the license notice before the
      first entry) when ``first_block``;
    * drops the tags that name a paragraph's source (``[1913 Webster]``, ``[WordNet 1.5]``,
      ``[PJC]`` ...: about 234,000, most on a line of their own, which goes too); usage labels
      such as ``[Obs.]`` and etymologies stay;
    * removes the braces of cross-references (``{Halloween}`` -> ``Halloween``).

    GCIDE's character entities (``[aum]``, ``[=e]``) and pronunciations are kept as they are.

    Example:
        >>> clean_gcide('Alley \\Al"ley\\, n.\n   See {Lane}.\n   [1913 Webster]\n')
        'Alley \\Al"ley\\, n.\n   See Lane.\n'
    """
    if first_block and text.lstrip().startswith("00-database"):
        m = _GCIDE_FIRST_ENTRY.search(text)
        text = text[m.start():] if m else ""
    text = _GCIDE_SOURCE_LINE.sub("", text)
    text = _GCIDE_SOURCE_TAG.sub("", text)
    return text.translate({ord("{"): None, ord("}"): None})


def _gcide_file(root) -> Path:
    info = DATASETS["gcide"]
    folder = resolve_path("gcide", root)
    return find_file(folder, "gcide.dict", info.suffixes)


def _open_text(path: Path):
    """Open a text file that may be gzip/dictzip compressed (detected from its magic bytes).

    GCIDE 0.48 has three stray cp1252 bytes; ``errors="replace"`` turns them into U+FFFD.
    """
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if magic == b"\x1f\x8b":  # gzip; a dictzip .dz file is a gzip file with an index
        return gzip.open(path, "rt", encoding="utf-8", errors="replace", newline="")
    return open(path, encoding="utf-8", errors="replace", newline="")


def _load_gcide(root, max_bytes: int | None) -> str:
    path = _gcide_file(root)
    parts, n_bytes, first = [], 0, True
    try:
        with _open_text(path) as fh:
            while max_bytes is None or n_bytes < max_bytes:
                lines = fh.readlines(_READ_HINT)
                if not lines:
                    break
                block = clean_gcide("".join(lines), first_block=first)
                first = False
                parts.append(block)
                if max_bytes is not None:
                    n_bytes += len(block.encode("utf-8"))
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DataFormatError(f"{path}: corrupt or truncated ({exc}).") from None
    return "".join(parts)


def _stdlib_dir(root) -> Path:
    base = Path(root).expanduser() if root is not None else Path(sysconfig.get_paths()["stdlib"])
    if not base.is_dir():
        raise DataNotFoundError(
            f"The 'stdlib' corpus needs a folder of Python sources; {str(base)!r} is not a folder. "
            "Pass root= pointing at a Python standard library (or leave it None for this "
            "interpreter's)."
        )
    return base


def _walk(base: Path, suffixes: tuple[str, ...], skip_dirs: frozenset[str]) -> list[Path]:
    """Files under ``base`` with one of ``suffixes``, sorted by their relative posix path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs and not d.startswith(".")]
        for name in filenames:
            if name.endswith(suffixes) and not name.startswith("."):
                found.append(Path(dirpath) / name)
    return sorted(found, key=lambda p: p.relative_to(base).as_posix())


_STDLIB_SKIP = frozenset({"site-packages", "dist-packages", "__pycache__"})


def _stdlib_files(root) -> tuple[Path, list[Path]]:
    base = _stdlib_dir(root)
    return base, _walk(base, (".py",), _STDLIB_SKIP)


def _user_files(source: Path) -> tuple[Path, list[Path]]:
    if source.is_file():
        return source.parent, [source]
    if source.is_dir():
        files = _walk(source, USER_TEXT_SUFFIXES, frozenset({"__pycache__"}))
        if not files:
            raise DataNotFoundError(
                f"No text files ({', '.join('*' + s for s in USER_TEXT_SUFFIXES)}) under {str(source)!r}."
            )
        return source, files
    raise DataNotFoundError(f"Corpus path {str(source)!r} does not exist.")


def _concat_files(files: list[Path], max_bytes: int | None, *, strict_single: bool) -> str:
    """Concatenate UTF-8 files with :data:`DOCUMENT_SEPARATOR`, skipping undecodable ones."""
    parts, n_bytes = [], 0
    for path in files:
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            if strict_single:
                raise DataFormatError(f"{path}: not UTF-8 text ({exc}).") from None
            continue  # e.g. the deliberately mis-encoded modules of CPython's test suite
        if parts:
            parts.append(DOCUMENT_SEPARATOR)
            n_bytes += len(DOCUMENT_SEPARATOR)
        parts.append(text)
        n_bytes += len(raw)
        if max_bytes is not None and n_bytes >= max_bytes:
            break
    return "".join(parts)


def _is_name(source) -> bool:
    return isinstance(source, str) and source in CORPORA


def _check_source(source) -> None:
    if _is_name(source) or isinstance(source, os.PathLike):
        return
    if isinstance(source, str):
        if os.sep in source or Path(source).suffix or Path(source).exists():
            return  # a path; a missing one fails with DataNotFoundError later
        err = unknown_name_error("source", source, CORPORA, owner="load_corpus")
        raise InvalidParameterError(f"{err} A path to a text file or folder is also accepted.")
    raise InvalidParameterError(
        f"The 'source' parameter of load_corpus must be one of {', '.join(map(repr, sorted(CORPORA)))} "
        f"or a path. Got {source!r} instead."
    )


def _truncate(text: str, max_bytes: int | None) -> str:
    if max_bytes is None:
        return text
    raw = text.encode("utf-8")
    if len(raw) <= max_bytes:
        return text
    # cut at the byte limit, dropping a character split by the cut
    return raw[:max_bytes].decode("utf-8", errors="ignore")


_MAX_BYTES = [None, Interval(int, 1, None)]


def load_corpus(
    source: str | os.PathLike, root: str | os.PathLike | None = None, max_bytes: int | None = None
) -> str:
    """Load a text corpus as one string.

    Args:
        source: ``"gcide"``, ``"stdlib"`` (see :data:`CORPORA`), or a path to a text file or to
            a folder whose ``*.txt``, ``*.py`` and ``*.md`` files are read in sorted order.
            Files of a folder are joined with :data:`DOCUMENT_SEPARATOR`; files of a folder that
            are not UTF-8 are skipped (a single file that is not raises).
        root: for ``"gcide"``, a folder holding ``gcide.dict.dz``; for ``"stdlib"``, the folder
            to read instead of this interpreter's standard library. Ignored for a path.
        max_bytes: keep the first ``max_bytes`` bytes of the UTF-8 text (a character cut in two
            is dropped); the same arguments always give the same text.

    Returns:
        The text.

    Raises:
        InvalidParameterError: unknown corpus name (the message lists the valid ones).
        DataNotFoundError: the corpus is not installed or the path does not exist.
        DataFormatError: a compressed file is corrupt or a single user file is not UTF-8.
    """
    _check_source(source)
    check_param("max_bytes", max_bytes, _MAX_BYTES, owner="load_corpus")
    if source == "gcide":
        text = _load_gcide(root, max_bytes)
    elif source == "stdlib":
        _, files = _stdlib_files(root)
        text = _concat_files(files, max_bytes, strict_single=False)
    else:
        path = Path(source).expanduser()
        _, files = _user_files(path)
        text = _concat_files(files, max_bytes, strict_single=path.is_file())
    return _truncate(text, max_bytes)


def _source_files(source, root) -> tuple[str, Path, list[Path]]:
    """(readable tag, base folder, files) of a corpus, without reading the files."""
    if source == "gcide":
        path = _gcide_file(root)
        return "gcide", path.parent, [path]
    if source == "stdlib":
        base, files = _stdlib_files(root)
        return "stdlib", base, files
    path = Path(source).expanduser()
    base, files = _user_files(path)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.resolve().name)[:40] or "corpus"
    return f"path-{stem}", base, files


def corpus_cache_key(
    source: str | os.PathLike, vocab_size: int, max_bytes: int | None = None, root=None
) -> str:
    """The file-name stem under which a tokenizer and its encoded corpus are cached.

    It encodes the source, the byte limit, the vocabulary size and a fingerprint of the source
    files (folder, relative paths, sizes and modification times; no file is read), so a changed
    corpus, another root or another interpreter's stdlib gets its own cache entry.
    """
    _check_source(source)
    tag, base, files = _source_files(source, root)
    h = hashlib.sha256()
    h.update(f"{_CORPUS_FORMAT}\n{_TOKENIZER_RECIPE}\n{base.resolve()}\n{max_bytes}\n".encode())
    for path in files:
        st = path.stat()
        h.update(f"{path.relative_to(base).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    limit = "all" if max_bytes is None else f"b{max_bytes}"
    return f"{tag}-{limit}-v{vocab_size}-{h.hexdigest()[:16]}"


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise MissingDependencyError(
            "The BPE tokenizer needs the 'tokenizers' package: pip install 'leanscale[text]'"
        ) from None
    return tokenizers


# Split points for chunking: after a newline that follows a non-space and before a non-space.
# The GPT-2 pre-tokenizer regex never joins text across such a point, so encoding the chunks
# separately gives exactly the ids of encoding the whole text (tested).
_CHUNK_BOUNDARY = re.compile(r"(?<=\S\n)(?=\S)")


def _chunks(text: str, chunk_chars: int | None = None) -> Iterator[str]:
    """Consecutive pieces of about ``chunk_chars`` characters, cut at ``_CHUNK_BOUNDARY``."""
    chunk_chars = chunk_chars or _CHUNK_CHARS
    start, n = 0, len(text)
    while start < n:
        if n - start <= chunk_chars:
            yield text[start:]
            return
        m = _CHUNK_BOUNDARY.search(text, start + chunk_chars)
        end = m.start() if m else n
        yield text[start:end]
        start = end


def _new_tokenizer(tokenizers):
    from tokenizers import decoders, models, pre_tokenizers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def _train(text: str, vocab_size: int):
    """Train a byte-level BPE tokenizer on ``text`` (deterministic for a given text)."""
    tokenizers = _import_tokenizers()
    from tokenizers import pre_tokenizers, trainers

    tok = _new_tokenizer(tokenizers)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: no unknown token
        show_progress=False,
    )
    chunks = list(_chunks(text))
    tok.train_from_iterator(chunks, trainer=trainer, length=len(chunks))
    return tok


_VOCAB = [Interval(int, 256 + len(SPECIAL_TOKENS), None)]


def _tokenizer_path(key: str) -> Path:
    return cache_dir() / "tokenizers" / f"{key}.json"


def train_bpe_tokenizer(
    source: str | os.PathLike,
    vocab_size: int = 2048,
    max_bytes: int | None = None,
    root: str | os.PathLike | None = None,
):
    """A byte-level BPE tokenizer trained on a corpus, cached on disk.

    The first call trains on :func:`load_corpus` ``(source, root, max_bytes)`` and writes
    ``cache_dir()/"tokenizers"/<key>.json`` (see :func:`corpus_cache_key`); later calls load that
    file. Training is deterministic, so a deleted cache file is rebuilt identically.

    Args:
        source: corpus name or path (as in :func:`load_corpus`).
        vocab_size: at most this many tokens: 256 bytes, ``<|endoftext|>`` (id 0) and merges. A
            small corpus may give fewer.
        max_bytes: train on the first ``max_bytes`` bytes only.
        root: as in :func:`load_corpus`.

    Returns:
        A ``tokenizers.Tokenizer``; ``tok.decode(tok.encode(text).ids) == text`` for any text
        without ``<|endoftext|>`` (decode with ``skip_special_tokens=False`` to keep it).

    Raises:
        MissingDependencyError: ``tokenizers`` is not installed (``pip install 'leanscale[text]'``).
    """
    check_param("vocab_size", vocab_size, _VOCAB, owner="train_bpe_tokenizer")
    check_param("max_bytes", max_bytes, _MAX_BYTES, owner="train_bpe_tokenizer")
    key = corpus_cache_key(source, vocab_size, max_bytes, root)
    return _cached_tokenizer(key, vocab_size, lambda: load_corpus(source, root, max_bytes))


def _cached_tokenizer(key: str, vocab_size: int, get_text):
    """Load the tokenizer cached under ``key``, or train it on ``get_text()`` and cache it."""
    tokenizers = _import_tokenizers()
    path = _tokenizer_path(key)
    if path.is_file():
        return tokenizers.Tokenizer.from_file(str(path))
    tok = _train(get_text(), vocab_size)
    atomic_write_text(path, tok.to_str())
    return tok


def encode_text(tokenizer, text: str, dtype=np.uint16) -> np.ndarray:
    """Token ids of ``text`` as a 1-d array, encoded in parallel over chunks of lines.

    Chunks end only where the byte-level pre-tokenizer would split anyway (see
    ``_CHUNK_BOUNDARY``), so the ids equal ``tokenizer.encode(text).ids``.
    """
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # fast: no offsets
    chunks = list(_chunks(text))
    out = []
    for i in range(0, len(chunks), _CHUNKS_PER_BATCH):
        for enc in encode(chunks[i : i + _CHUNKS_PER_BATCH], add_special_tokens=False):
            out.append(np.asarray(enc.ids, dtype=dtype))
    return np.concatenate(out) if out else np.empty(0, dtype=dtype)


def encode_corpus(
    source: str | os.PathLike,
    vocab_size: int = 2048,
    max_bytes: int | None = None,
    root: str | os.PathLike | None = None,
) -> np.ndarray:
    """The whole corpus as token ids, cached as ``<key>.npy`` next to the tokenizer.

    Args:
        source, vocab_size, max_bytes, root: as in :func:`train_bpe_tokenizer`.

    Returns:
        1-d array of token ids: uint16 when ``vocab_size <= 65536``, else uint32.

    Under DDP, call it on rank 0 before a barrier so the other ranks load the cache instead of
    all training at once (concurrent calls are safe, only wasteful: every write is atomic).
    Cold, the full gcide or stdlib corpus took 17-60 s to load, train and encode at vocabulary
    2048 on a 2-core machine shared with other jobs; warm (cached .npy), under 0.2 s.
    """
    check_param("vocab_size", vocab_size, _VOCAB, owner="encode_corpus")
    check_param("max_bytes", max_bytes, _MAX_BYTES, owner="encode_corpus")
    _import_tokenizers()
    key = corpus_cache_key(source, vocab_size, max_bytes, root)
    npy = cache_dir() / "tokenizers" / f"{key}.npy"
    if npy.is_file():
        try:
            ids = read_npy(npy, what="token cache file", ndim=1)
            if ids.dtype in (np.uint16, np.uint32) and (ids.size == 0 or int(ids.max()) < vocab_size):
                return ids
            reason = f"it holds {ids.dtype} ids up to {int(ids.max()) if ids.size else 0}, not ids below {vocab_size}"
        except DataFormatError as exc:  # truncated or damaged (e.g. a killed copy): encode again
            reason = str(exc)
        warnings.warn(f"the token cache {str(npy)!r} is damaged ({reason}); encoding the corpus again",
                      RuntimeWarning, stacklevel=2)
        npy.unlink(missing_ok=True)
    text = load_corpus(source, root, max_bytes)
    tok = _cached_tokenizer(key, vocab_size, lambda: text)
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
    ids = encode_text(tok, text, dtype=dtype)
    buf = io.BytesIO()
    np.save(buf, ids, allow_pickle=False)
    atomic_write_bytes(npy, buf.getvalue())
    return ids


# ----------------------------------------------------------------------------------------------
# Single-epoch batches
# ----------------------------------------------------------------------------------------------


class TokenBatches:
    """Iterator of ``(x, y)`` int64 tensors of shape (B, T), ``y`` = ``x`` shifted by one token.

    ``len()`` is the number of batches; built by :meth:`TokenStream.train_batches` and
    :meth:`TokenStream.val_batches`.
    """

    def __init__(self, tokens: np.ndarray, starts: np.ndarray, block_size: int):
        self._tokens = tokens
        self._starts = starts  # (n_batches, B) window starts
        self._offsets = np.arange(block_size + 1)  # (T+1,)
        self._step = 0

    def __len__(self) -> int:
        return len(self._starts)

    def __iter__(self) -> TokenBatches:
        return self

    def __next__(self):
        import torch

        if self._step >= len(self._starts):
            raise StopIteration
        starts = self._starts[self._step]
        self._step += 1
        window = self._tokens[starts[:, None] + self._offsets].astype(np.int64)  # (B, T+1)
        x = torch.from_numpy(np.ascontiguousarray(window[:, :-1]))  # (B, T)
        y = torch.from_numpy(np.ascontiguousarray(window[:, 1:]))  # (B, T)
        return x, y


class TokenStream:
    """Token ids split into a training stream and a held-out validation tail.

    The last ``val_fraction`` of the tokens (rounded up) is validation; the rest is training.
    Training windows of ``block_size`` inputs start at multiples of ``block_size``: their inputs
    never overlap, and their targets (inputs shifted by one) stay inside the training part, so no
    validation token is ever trained on.

    Example:
        >>> stream = TokenStream(np.arange(1000, dtype=np.uint16), val_fraction=0.1)
        >>> stream.n_train_tokens, stream.n_val_tokens
        (900, 100)
        >>> batches = stream.train_batches(batch_size=4, block_size=8, n_tokens=320, seed=0)
        >>> len(batches)
        10
        >>> x, y = next(batches)
        >>> tuple(x.shape), bool((y[:, :-1] == x[:, 1:]).all())
        ((4, 8), True)
    """

    _parameter_constraints = {
        "val_fraction": [Interval(float, 0, 1, closed="left")],
        "batch_size": [Interval(int, 1, None)],
        "block_size": [Interval(int, 1, None)],
        "n_tokens": [Interval(int, 1, None)],
        "seed": [Interval(int, 0, None)],
        "world_size": [Interval(int, 1, None)],
        "max_batches": [None, Interval(int, 1, None)],
    }

    def __init__(self, tokens: np.ndarray, val_fraction: float = 0.05):
        check_param("val_fraction", val_fraction, self._parameter_constraints["val_fraction"],
                    owner="TokenStream")
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise InvalidParameterError(
                "The 'tokens' parameter of TokenStream must be a 1-d array of integer token ids. "
                f"Got {tokens.dtype.name} of shape {tokens.shape}."
            )
        self.tokens = tokens
        self.val_fraction = val_fraction
        n_val = math.ceil(len(tokens) * val_fraction)
        self.train_tokens = tokens[: len(tokens) - n_val]  # views, no copy
        self.val_tokens = tokens[len(tokens) - n_val :]

    @classmethod
    def from_corpus(
        cls,
        source: str | os.PathLike,
        vocab_size: int = 2048,
        max_bytes: int | None = None,
        root: str | os.PathLike | None = None,
        val_fraction: float = 0.05,
    ) -> TokenStream:
        """A stream over :func:`encode_corpus` ``(source, vocab_size, max_bytes, root)``."""
        return cls(encode_corpus(source, vocab_size, max_bytes, root), val_fraction=val_fraction)

    @property
    def n_train_tokens(self) -> int:
        """Tokens in the training part."""
        return len(self.train_tokens)

    @property
    def n_val_tokens(self) -> int:
        """Tokens in the validation part."""
        return len(self.val_tokens)

    def _check(self, owner: str, **params) -> None:
        for name, value in params.items():
            check_param(name, value, self._parameter_constraints[name], owner=owner)

    def train_batches(
        self,
        batch_size: int,
        block_size: int,
        n_tokens: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> TokenBatches:
        """Training batches for one pass over ``n_tokens`` tokens, none of them seen twice.

        The training part is cut into windows of ``block_size`` inputs (plus the next token as
        the last target); a permutation of the windows drawn from ``seed`` is taken in order.
        Step ``s`` uses the ``s``-th group of ``batch_size * world_size`` windows and rank ``r``
        takes the ``r``-th ``batch_size`` of them, so ranks never share a window and the global
        batch is the same whatever the number of ranks.

        Args:
            batch_size: windows per batch on this rank (B).
            block_size: tokens per window (T).
            n_tokens: input tokens to train on in total over all ranks; the number of steps is
                ``n_tokens // (batch_size * block_size * world_size)``.
            seed: seed of the window order; every rank must pass the same one.
            rank, world_size: this process's place under DDP (``torch.distributed.get_rank()``
                and ``get_world_size()``).

        Returns:
            :class:`TokenBatches` of ``(x, y)`` int64 tensors of shape (B, T).

        Raises:
            InvalidParameterError: ``n_tokens`` exceeds the training tokens available at this
                ``block_size`` (the message says how many there are) or is less than one global
                batch, or a parameter is out of range.
        """
        owner = "TokenStream.train_batches"
        self._check(owner, batch_size=batch_size, block_size=block_size, n_tokens=n_tokens,
                    seed=seed, world_size=world_size)
        check_param("rank", rank, [Interval(int, 0, world_size - 1)], owner=owner)
        n_windows = max(self.n_train_tokens - 1, 0) // block_size
        available = n_windows * block_size
        if n_tokens > available:
            raise InvalidParameterError(
                f"The 'n_tokens' parameter of {owner} must be at most the {available:,} training "
                f"tokens available ({n_windows:,} windows of block_size={block_size} in "
                f"{self.n_train_tokens:,} training tokens). Got {n_tokens:,}: use a larger corpus "
                "or fewer tokens; single-epoch training never repeats a token."
            )
        per_step = batch_size * block_size * world_size
        n_steps = n_tokens // per_step
        if n_steps == 0:
            raise InvalidParameterError(
                f"The 'n_tokens' parameter of {owner} must be at least one global batch of "
                f"batch_size * block_size * world_size = {per_step:,} tokens. Got {n_tokens:,}."
            )
        order = np.random.default_rng(seed).permutation(n_windows)
        order = order[: n_steps * batch_size * world_size].reshape(n_steps, world_size, batch_size)
        starts = order[:, rank, :] * block_size  # (n_steps, B)
        return TokenBatches(self.train_tokens, starts, block_size)

    def val_batches(
        self, batch_size: int, block_size: int, max_batches: int | None = None
    ) -> TokenBatches:
        """Validation batches: consecutive windows from the start of the validation part.

        Deterministic and identical on every rank; only full batches are returned.

        Args:
            batch_size: windows per batch (B).
            block_size: tokens per window (T).
            max_batches: at most this many batches (None: all full batches).

        Raises:
            InvalidParameterError: the validation part is smaller than one batch.
        """
        owner = "TokenStream.val_batches"
        self._check(owner, batch_size=batch_size, block_size=block_size, max_batches=max_batches)
        n_windows = max(self.n_val_tokens - 1, 0) // block_size
        n_batches = n_windows // batch_size
        if n_batches == 0:
            raise InvalidParameterError(
                f"The validation part of {self.n_val_tokens:,} tokens holds {n_windows} windows of "
                f"block_size={block_size}, less than one batch of batch_size={batch_size}: use a "
                "larger val_fraction or a smaller batch."
            )
        if max_batches is not None:
            n_batches = min(n_batches, max_batches)
        starts = np.arange(n_batches * batch_size).reshape(n_batches, batch_size) * block_size
        return TokenBatches(self.val_tokens, starts, block_size)
