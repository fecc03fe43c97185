import gzip
import sysconfig
from pathlib import Path

import pytest

from leanscale.core.errors import DataNotFoundError, InvalidParameterError
from leanscale.data import DOCUMENT_SEPARATOR, DataFormatError, load_corpus
from leanscale.data.text import clean_gcide

GCIDE_SAMPLE = """

00-database-url
   ftp://ftp.gnu.org/gnu/gcide

00-database-info
   This file was converted from the original database.
   GCIDE is free software; see {GPL}.

A \\A\\, n.
   The first letter of the English alphabet. See {B}.
   [1913 Webster]

Abacus \\Ab"a*cus\\, n.
   A calculating frame. [Obs.]
   [Webster 1913 Suppl. +PJC]
   [1913 Webster]
"""


def _user_dir(tmp_path: Path) -> Path:
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / ".git").mkdir()
    (d / "b.txt").write_text("second file\n", encoding="utf-8")
    (d / "a.md").write_text("# first file\n", encoding="utf-8")
    (d / "sub" / "c.py").write_text("print('third')\n", encoding="utf-8")
    (d / "sub" / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))  # not UTF-8: skipped
    (d / "ignored.csv").write_text("not a text suffix\n", encoding="utf-8")
    (d / ".hidden.txt").write_text("hidden\n", encoding="utf-8")
    (d / ".git" / "x.txt").write_text("git internals\n", encoding="utf-8")
    return d


def test_user_directory_sorted_with_separator(tmp_path):
    text = load_corpus(_user_dir(tmp_path))
    assert text == DOCUMENT_SEPARATOR.join(["# first file\n", "second file\n", "print('third')\n"])
    assert load_corpus(str(_user_dir(tmp_path / "again"))) == text  # str path works too


def test_user_single_file(tmp_path):
    f = tmp_path / "notes.log"
    f.write_text("any suffix is fine for a single file\n", encoding="utf-8")
    assert load_corpus(f) == "any suffix is fine for a single file\n"
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9")
    with pytest.raises(DataFormatError, match="not UTF-8"):
        load_corpus(bad)


def test_missing_path_and_empty_dir(tmp_path):
    with pytest.raises(DataNotFoundError, match="does not exist"):
        load_corpus(tmp_path / "nope.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match=r"No text files \(\*\.txt, \*\.py, \*\.md\)"):
        load_corpus(tmp_path / "empty")


def test_unknown_name_lists_valid_ones():
    with pytest.raises(InvalidParameterError, match=r"'gcide', 'stdlib'.*Did you mean 'gcide'"):
        load_corpus("gcid")
    with pytest.raises(InvalidParameterError, match="'source'"):
        load_corpus(42)


def test_max_bytes_truncates_deterministically(tmp_path):
    f = tmp_path / "u.txt"
    f.write_text("aé" * 10, encoding="utf-8")  # é is 2 bytes
    assert load_corpus(f, max_bytes=2) == "a"  # the cut é is dropped
    assert load_corpus(f, max_bytes=3) == "aé"
    assert load_corpus(f, max_bytes=10**6) == "aé" * 10
    with pytest.raises(InvalidParameterError, match="'max_bytes'"):
        load_corpus(f, max_bytes=0)


def test_stdlib_with_root(tmp_path):
    lib = tmp_path / "lib"
    (lib / "site-packages").mkdir(parents=True)
    (lib / "pkg" / "__pycache__").mkdir(parents=True)
    (lib / "z.py").write_text("z = 1\n")
    (lib / "pkg" / "a.py").write_text("a = 1\n")
    (lib / "pkg" / "__pycache__" / "a.py").write_text("cached = 1\n")
    (lib / "site-packages" / "third.py").write_text("third_party = 1\n")
    (lib / "bad.py").write_bytes(b"# -*- coding: latin-1 -*-\nx = '\xe9'\n")
    (lib / "notes.txt").write_text("not python\n")
    assert load_corpus("stdlib", root=lib) == "a = 1\n" + DOCUMENT_SEPARATOR + "z = 1\n"
    with pytest.raises(DataNotFoundError, match="not a folder"):
        load_corpus("stdlib", root=tmp_path / "missing")


def test_installed_stdlib_prefix():
    text = load_corpus("stdlib", max_bytes=50_000)
    assert len(text.encode("utf-8")) == 50_000
    assert text == load_corpus("stdlib", max_bytes=50_000)
    assert load_corpus("stdlib", max_bytes=60_000).startswith(text)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    first = sorted(p.relative_to(stdlib).as_posix() for p in stdlib.glob("*.py"))[0]
    assert text.startswith((stdlib / first).read_text(encoding="utf-8")[:1000])


def test_clean_gcide_rules():
    out = clean_gcide(GCIDE_SAMPLE)
    assert out.startswith("A \\A\\, n.\n")
    assert "00-database" not in out and "[1913 Webster]" not in out and "PJC" not in out
    assert "See B." in out and "{" not in out and "}" not in out
    assert "[Obs.]" in out  # usage labels stay
    assert clean_gcide("x {y}\n", first_block=False) == "x y\n"


def test_gcide_in_user_root(tmp_path):
    (tmp_path / "gcide.dict.dz").write_bytes(gzip.compress(GCIDE_SAMPLE.encode("utf-8")))
    assert load_corpus("gcide", root=tmp_path) == clean_gcide(GCIDE_SAMPLE)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "gcide.dict").write_text(GCIDE_SAMPLE, encoding="utf-8")
    assert load_corpus("gcide", root=plain) == clean_gcide(GCIDE_SAMPLE)


def test_gcide_truncated_and_missing(tmp_path):
    blob = gzip.compress(GCIDE_SAMPLE.encode("utf-8") * 50)
    (tmp_path / "gcide.dict.dz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataFormatError, match="corrupt or truncated"):
        load_corpus("gcide", root=tmp_path)
    with pytest.raises(DataNotFoundError, match="sudo apt-get install dict-gcide"):
        load_corpus("gcide", root=tmp_path / "nowhere")


@pytest.mark.requires_data("gcide")
def test_installed_gcide_prefix_is_clean_and_deterministic():
    text = load_corpus("gcide", max_bytes=300_000)
    assert len(text.encode("utf-8")) == 300_000
    assert text.startswith("0 \\0\\ adj.")
    assert "[1913 Webster]" not in text and "{" not in text and "00-database" not in text
    assert text == load_corpus("gcide", max_bytes=300_000)
    assert load_corpus("gcide", max_bytes=1000) == text[:1000]
