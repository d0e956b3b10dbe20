"""Dataset browser flows on the bundled source."""

from __future__ import annotations

from tests.app.conftest import open_page

BROWSER = "pages/1_Dataset_Browser.py"


def test_filter_open_and_interpret_hands_over_through_the_url():
    at = open_page(BROWSER)
    assert not at.exception and len(at.get("image")) == 24
    at.text_input(key="q").set_value("circle").run()
    shown = [c.value for c in at.caption if "examples match" in c.value][0]
    from vlcore.data.easy_vqa import load_easy_vqa

    expect = sum("circle" in r.question.lower() for r in load_easy_vqa("test"))
    assert shown == f"easy-VQA (test): {expect:,} of 9,673 examples match."
    questions = [c.value for c in at.caption if "circle" in c.value]
    assert len(questions) == 24
    first = next(b for b in at.button if b.key and b.key.startswith("open_"))
    first.click().run()
    ex = at.query_params["ex"]
    assert ex == f"easy_vqa/test/{first.key.removeprefix('open_')}"
    assert at.subheader[0].value == f"Example `{ex}`"
    at.button(key="interpret").click().run()
    assert not at.exception
    assert at.title[0].value == "Run model" and at.query_params["ex"] == ex
    assert any(m.value.startswith("**Prediction:**") for m in at.markdown)


def test_category_filter_and_paging():
    at = open_page(BROWSER)
    at.multiselect(key="cat").set_value(["shape"]).run()
    caption = next(c.value for c in at.caption if "examples match" in c.value)
    n = int(caption.split(": ")[1].split(" of")[0].replace(",", ""))
    assert 0 < n < 9673
    at.number_input(key="page").set_value(10_000).run()  # out of range: clamped to the last page
    assert not at.exception
    assert any(c.value.startswith("Page ") and c.value.split()[1] == c.value.split()[3] for c in at.caption)


def test_no_match_gives_a_message():
    at = open_page(BROWSER)
    at.text_input(key="q").set_value("zebra crossing").run()
    assert not at.exception and any("No example matches" in i.value for i in at.info)
