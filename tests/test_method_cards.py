"""Every method card's API table is current (#14).

For each package with a method card (``src/leanscale/<pkg>/README.md``):

- every name in ``leanscale.<pkg>.__all__`` is written in backticks in a row of an API table of the
  card (a markdown table whose header is ``| function / class | ...``, ``| piece | ...`` or
  ``| name | module | ...``);
- every backticked name in the first column of those tables exists: importable from the package,
  from the module the row names (the ``module`` column of the cascade card), or as a dotted path
  (``leanscale.models.embed_texts``, ``train.lm.train_lm``, ``ParametricScalingLaw.bootstrap``);
- where such a name is written as a call, ``name(a, b=..., *, c)``, every argument written as a
  plain name is one of the callable's parameters, and not the old name of a renamed one (a keyword
  renamed in #14 and left in the card fails, though the code accepts it for one release);
- a call written in the description column (a span that starts ``fit(X, y)``, ``advise()``) is a
  method or an attribute of a name of that row, a parameter of it, or a name of the package.

``tests/cascade/test_api_table.py`` checks more for the cascade card (the module column of each row).
"""

from __future__ import annotations

import importlib
import inspect
import re
import warnings
from pathlib import Path
from types import ModuleType

import pytest

PACKAGES = ("large_batch", "pruning", "scaling", "sparse", "cascade", "train")
SRC = Path(__file__).resolve().parents[1] / "src" / "leanscale"
API_HEADERS = ("function / class", "piece", "name")  # the first header cell of an API table

_SPAN = re.compile(r"`([^`]+)`")
_DOTTED = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
_CALL = re.compile(r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)\(")
_ARG = re.compile(r"\*{0,2}([A-Za-z_]\w*)\s*(?:=.*)?", re.S)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def api_rows(text: str) -> list[list[str]]:
    """The rows (as lists of cells) of every API table of a card, header and separator left out."""
    rows, in_api, lines = [], False, text.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("|"):
            in_api = False
            continue
        is_header = i + 1 < len(lines) and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", lines[i + 1].strip()) is not None
        if is_header and (i == 0 or not lines[i - 1].startswith("|")):
            in_api = _cells(line)[0] in API_HEADERS
            continue
        if in_api and not re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", line.strip()):
            rows.append(_cells(line))
    return rows


def documented_names(rows: list[list[str]]) -> set[str]:
    """Every identifier inside backticks anywhere in the API rows."""
    names = set()
    for row in rows:
        for span in _SPAN.findall(" | ".join(row)):
            names.update(re.findall(r"[A-Za-z_]\w*", span))
    return names


def _call_args(span: str, start: int) -> str:
    """The text between the parenthesis opening at ``span[start]`` and its match."""
    depth = 0
    for j in range(start, len(span)):
        depth += {"(": 1, ")": -1}.get(span[j], 0)
        if depth == 0:
            return span[start + 1:j]
    return span[start + 1:]


def _split_top(args: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in args:
        depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [*parts, cur]


def resolve(dotted: str, bases: list[ModuleType]) -> object:
    """``dotted`` as an attribute path from the first base that has it (submodules imported on the way)."""
    if dotted.startswith("leanscale."):  # a full path
        dotted, bases = dotted.removeprefix("leanscale."), [importlib.import_module("leanscale")]
    elif dotted.split(".")[0] in ("torch", "np", "numpy") and "." in dotted:  # e.g. `torch.load(path)`
        bases = [importlib.import_module("numpy" if dotted.startswith("np.") else "torch")]
        dotted = dotted.split(".", 1)[1]
    for base in bases:
        obj: object = base
        for part in dotted.split("."):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error", FutureWarning)  # a deprecated alias is no home of a name
                    found = hasattr(obj, part)
            except FutureWarning:
                found = False
            if found:
                obj = getattr(obj, part)
            elif isinstance(obj, ModuleType):
                try:
                    obj = importlib.import_module(f"{obj.__name__}.{part}")
                except ModuleNotFoundError:
                    break
            else:
                break
        else:
            return obj
    raise LookupError(dotted)


def _parameters(obj: object) -> set[str] | None:
    """The parameter names of a callable, None when anything goes (``**kwargs``) or unknown."""
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


def _deprecated(obj: object) -> set[str]:
    """Old names of renamed parameters that ``obj`` still accepts for one release: the second argument
    of every ``renamed_argument(owner, "old", ...)`` in its module, and a class's ``_renamed`` keys."""
    module = inspect.getmodule(obj)
    try:
        source = inspect.getsource(module) if module is not None else ""
    except (OSError, TypeError):
        source = ""
    old = set(re.findall(r"renamed_argument\(\s*[^,()]+,\s*[\"'](\w+)[\"']", source))
    renamed = getattr(obj, "_renamed", None) if inspect.isclass(obj) else None
    return old | set(renamed or ())


def card_problems(package: ModuleType, text: str) -> list[str]:
    """What is wrong with the API tables of ``text`` as the card of ``package`` (empty: current)."""
    rows = api_rows(text)
    if not rows:
        return ["the card has no API table (header `| function / class |`, `| piece |` or `| name |`)"]
    problems = [f"{name!r} of __all__ has no row in the API table"
                for name in sorted(set(package.__all__) - documented_names(rows))]
    leanscale = importlib.import_module("leanscale")
    for row in rows:
        bases = [package, leanscale]
        if len(row) == 3 and re.fullmatch(r"`\w+`", row[1]):  # a module column (the cascade card)
            try:
                bases.insert(0, importlib.import_module(f"{package.__name__}.{row[1].strip('`')}"))
            except ModuleNotFoundError:
                problems.append(f"row {row[0]!r}: no module {package.__name__}.{row[1].strip('`')}")
        row_objects = []
        for span in _SPAN.findall(row[0]):
            head = _DOTTED.match(span)
            if not head:
                continue
            for dotted in [head.group(0), *_CALL.findall(span)[1:]]:
                try:
                    obj = resolve(dotted, bases)
                except LookupError:
                    if dotted.split(".")[0] in ("create_app", "serve"):  # imported on first use (FastAPI)
                        continue
                    problems.append(f"row {row[0]!r}: {dotted!r} does not exist")
                    continue
                row_objects.append(obj)
            for m in _CALL.finditer(span):
                try:
                    obj = resolve(m.group(1), bases)
                except LookupError:
                    continue  # reported above
                params = _parameters(obj)
                if params is None:
                    continue
                for arg in _split_top(_call_args(span, m.end() - 1)):
                    arg = arg.strip()
                    named = _ARG.fullmatch(arg)
                    if arg in ("", "*", "...", "/") or not named:
                        continue
                    if named.group(1) not in params:
                        problems.append(f"row {row[0]!r}: {m.group(1)} has no parameter {named.group(1)!r}")
                    elif named.group(1) in _deprecated(obj):
                        problems.append(f"row {row[0]!r}: {m.group(1)}'s parameter {named.group(1)!r} was renamed")
        for cell in row[1:]:
            for span in _SPAN.findall(cell):
                call = _CALL.match(span)  # `fit(X, y)`, `advise()`; not a formula such as `1 + cos(x)`
                for name in [call.group(1)] if call else []:
                    first = name.split(".")[0]
                    ok = any(hasattr(o, first) or first in (_parameters(o) or ()) for o in row_objects)
                    if not ok:
                        try:
                            resolve(name, bases)
                            ok = True
                        except LookupError:
                            pass
                    if not ok:
                        problems.append(f"row {row[0]!r}: {name}( in {cell[:40]!r}... names nothing of the row")
    return problems


@pytest.mark.parametrize("pkg", PACKAGES)
def test_api_table_is_current(pkg):
    package = importlib.import_module(f"leanscale.{pkg}")
    card = SRC / pkg / "README.md"
    problems = card_problems(package, card.read_text(encoding="utf-8"))
    assert problems == [], f"{card.relative_to(SRC.parents[1])}:\n  " + "\n  ".join(problems)


def test_the_check_fails_on_a_stale_card():
    """A missing name, a name that does not exist and a renamed keyword are each reported."""
    package = importlib.import_module("leanscale.large_batch")
    rows = [f"| `{name}` | x |" for name in package.__all__ if name not in ("scale_lr", "LARS")]
    card = "\n".join([
        "# card", "",
        "| function / class | what it does |", "|---|---|",
        *rows,
        "| `scale_lr(base_lr, base_batch, batch_size)` | stale keyword |",  # renamed to base_batch_size
        "| `warmup_factor(step, warmup_steps, start=0.0)` | x |",  # no such parameter
        "| `no_such_function(x)` | gone |",
        "| `sharpness(model)` | calls `nonexistent_method()` |",
        "",
        "| column | batch |", "|---|---|", "| `LARS` | 1 |",  # not an API table: does not count
    ])
    problems = card_problems(package, card)
    assert "'LARS' of __all__ has no row in the API table" in problems
    assert any("scale_lr's parameter 'base_batch' was renamed" in p for p in problems)
    assert any("warmup_factor has no parameter 'start'" in p for p in problems)
    assert any("'no_such_function' does not exist" in p for p in problems)
    assert any("nonexistent_method(" in p for p in problems)
    assert len(problems) == 5, problems
    assert card_problems(package, "# a card without a table\n") != []
