"""Self-contained HTML reports (leanscale.report.html)."""

import base64
import doctest
import re

import pytest

import leanscale.report.html as html_mod
from leanscale.core.errors import InvalidParameterError
from leanscale.report.html import HTMLReport, RawHTML

# The smallest valid PNG (1x1 transparent pixel).
TINY_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)


def _img_sources(page: str) -> list[str]:
    return re.findall(r'src="([^"]*)"', page)


def test_report_is_self_contained_with_embedded_png():
    report = HTMLReport("Tour")
    report.add_section("Figures", "One figure.")
    report.add_figure(TINY_PNG, caption="a pixel")
    page = report.render()
    assert page.startswith("<!DOCTYPE html>")
    assert "http://" not in page and "https://" not in page
    assert "<link" not in page and "<script" not in page
    (src,) = _img_sources(page)
    assert src.startswith("data:image/png;base64,")
    assert base64.b64decode(src.split(",", 1)[1]) == TINY_PNG
    assert "<figcaption>a pixel</figcaption>" in page


def test_matplotlib_figure_is_embedded():
    pytest.importorskip("matplotlib")
    from leanscale.report.figures import new_figure

    fig, ax = new_figure()
    ax.plot([1, 2, 3], [3, 1, 2])
    report = HTMLReport("Fig")
    report.add_figure(fig, caption="line")
    (src,) = _img_sources(report.render())
    assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")


def test_all_text_is_escaped():
    evil = "<script>alert(1)</script>"
    report = HTMLReport(evil, subtitle=evil)
    report.add_section(evil, evil)
    report.add_section("second", evil, level=3)
    report.add_paragraph(evil)
    report.add_note(evil, kind="failed")
    report.add_preformatted(evil)
    report.add_details(evil, evil)
    report.add_table([{evil: evil, "n": 1}], caption=evil)
    report.add_figure(TINY_PNG, caption=evil)
    page = report.render()
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_raw_html_is_not_escaped():
    report = HTMLReport("raw")
    report.add_section("s", RawHTML("<em>kept</em>"))
    report.add_paragraph(RawHTML("<b>bold</b>"))
    report.add_html("<hr>")
    page = report.render()
    assert "<em>kept</em>" in page and "<p><b>bold</b></p>" in page and "<hr>" in page


def test_table_formats_numbers_and_marks_numeric_cells():
    report = HTMLReport("t")
    report.add_table(
        [{"n_params": 70e9, "loss": 1.93667, "name": "chinchilla", "missing": None}],
        columns=["name", "n_params", "loss", "missing"],
        caption="Chinchilla",
    )
    page = report.render()
    assert "<caption>Chinchilla</caption>" in page
    assert '<td class="num">7e10</td>' in page
    assert '<td class="num">1.937</td>' in page
    assert "<td>chinchilla</td>" in page and "<td>-</td>" in page
    assert page.index("<th>name</th>") < page.index("<th>n_params</th>")


def test_sections_anchors_and_contents():
    report = HTMLReport("r")
    a = report.add_section("Same title")
    b = report.add_section("Same title")
    report.add_section("Sub", level=3)
    assert a != b
    page = report.render()
    assert f'href="#{a}"' in page and f'href="#{b}"' in page
    assert 'href="#sub"' not in page  # level-3 sections stay out of the contents
    with pytest.raises(InvalidParameterError, match="'level'"):
        report.add_section("x", level=1)


def test_paragraphs_split_on_blank_lines():
    report = HTMLReport("r")
    report.add_section("s", "first\n\nsecond")
    assert "<p>first</p>\n<p>second</p>" in report.render()


def test_extend_keeps_blocks_and_unique_anchors():
    a, b = HTMLReport("a"), HTMLReport("b")
    a.add_section("Intro")
    b.add_section("Intro")
    b.add_paragraph("from b")
    a.extend(b)
    page = a.render()
    assert "from b" in page
    assert 'id="intro"' in page and 'id="intro-2"' in page


@pytest.mark.parametrize("bad", [b"not a png", "a string", 3])
def test_add_figure_rejects_non_png(bad):
    with pytest.raises(InvalidParameterError, match="fig_or_png"):
        HTMLReport("r").add_figure(bad)


def test_write_is_atomic_and_returns_path(tmp_path):
    report = HTMLReport("written")
    report.add_paragraph("hello")
    path = report.write(tmp_path / "sub" / "index.html")
    assert path.read_text(encoding="utf-8") == report.render()
    assert sorted(p.name for p in path.parent.iterdir()) == ["index.html"]  # no temp file left


def test_docstring_examples():
    assert doctest.testmod(html_mod, raise_on_error=False).failed == 0
