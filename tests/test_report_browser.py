"""The report pages in a real headless Chromium (Debian's chromium + chromium-driver; `make test` installs them):
the run page of a short ProtoPNet run and the page of a short sweep load from file:// with no broken image, link or
anchor and no console error, look like something (screenshot not blank), their card filters work, and both still
work from a copy of the folder. Without chromium these tests fail instead of skipping: tests/report_browser.py."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.report_browser import Browser, pixel_spread
from tests.report_runs import other_models_run, report_run, report_sweep

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("report")]


@pytest.fixture(scope="module")
def browser():
    with Browser() as b:
        yield b


@pytest.fixture(scope="module")
def run() -> Path:
    return report_run()


@pytest.fixture(scope="module")
def sweep() -> Path:
    return report_sweep()


def assert_sound(info: dict) -> None:
    for key in ("broken_images", "broken_anchors", "broken_links", "external", "console_errors"):
        assert info[key] == [], f"{key}: {info[key][:5]}"
    assert info["scripts_external"] == 0 and info["stylesheets_external"] == 0


def assert_not_blank(browser: Browser) -> None:
    std, colours = pixel_spread(browser.screenshot(full=True))
    assert std > 20 and colours > 500, (std, colours)


def test_run_page_loads_whole(browser, run):
    info = browser.check(run / "report.html")
    assert_sound(info)
    assert info["images"] > 100 and info["anchors"] > 15 and info["links"]
    # one card per unit of the dissected layer (add_on: 128 channels) and per prototype (120)
    assert info["cards"] == 128 + 120
    assert info["title"] == f"Run report: {run.name}"
    assert_not_blank(browser)


def test_run_page_filters_and_sorts_unit_cards(browser, run):
    browser.open(run / "report.html")
    result = browser.script("""
        const set = document.querySelector('.cardset');
        const select = set.querySelector('select.concept');
        const concept = select.options[1].value;   // the most frequent concept
        select.value = concept; select.dispatchEvent(new Event('change'));
        const cards = Array.from(set.querySelectorAll('.card'));
        const shown = cards.filter(c => c.style.display !== 'none');
        const sort = set.querySelector('select.sort');
        sort.value = 'iou'; sort.dispatchEvent(new Event('change'));
        const order = Array.from(set.querySelectorAll('.card')).filter(c => c.style.display !== 'none')
            .map(c => parseFloat(c.dataset.iou));
        return {concept: concept, shown: shown.length, total: cards.length,
                matching: cards.filter(c => c.dataset.concept === concept).length,
                count: set.querySelector('.count').textContent, order: order};
    """)
    assert 0 < result["shown"] == result["matching"] < result["total"]
    assert result["count"] == f"{result['shown']} of {result['total']} shown"
    assert result["order"] == sorted(result["order"], reverse=True)


def test_sweep_page_and_its_job_pages_load_whole(browser, sweep):
    info = browser.check(sweep / "report.html")
    assert_sound(info)
    jobs = [link for link in info["links"] if link.endswith("/report.html")]
    assert len(jobs) == 2
    assert_not_blank(browser)
    for job in jobs:
        job_info = browser.check(job)
        assert_sound(job_info)
        assert job_info["cards"] > 0


def test_pages_work_from_a_copied_folder(browser, run, sweep, tmp_path):
    run_copy = tmp_path / "elsewhere" / "run"
    shutil.copytree(run, run_copy, ignore=shutil.ignore_patterns("checkpoints", "wandb"))
    original = browser.check(run / "report.html")
    copied = browser.check(run_copy / "report.html")
    assert_sound(copied)
    assert all(str(tmp_path) in link for link in copied["links"])   # relative links, resolved in the copy
    for key in ("images", "anchors", "cards"):
        assert copied[key] == original[key]
    sweep_copy = tmp_path / "elsewhere" / "sweep"
    shutil.copytree(sweep, sweep_copy, ignore=shutil.ignore_patterns("checkpoints", "wandb"))
    info = browser.check(sweep_copy / "report.html")
    assert_sound(info)
    assert all(str(sweep_copy) in link for link in info["links"])


def test_capsule_icnn_and_dynamic_k_sections_load_whole(browser, tmp_path):
    from pipeline.report import build_run_report
    path, _ = build_run_report(other_models_run(tmp_path / "run"))
    info = browser.check(path)
    assert_sound(info)
    assert info["images"] == 3
    assert_not_blank(browser)


def test_the_checks_catch_a_broken_page(browser, tmp_path):
    """The checks above are only worth something if they fail on a broken page."""
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><head><title>b</title></head><body>'
                    '<img src="missing.png" alt="gone"><a href="#nowhere">x</a><a href="nofile.csv">y</a>'
                    '<img src="https://example.invalid/x.png" alt="remote">'
                    '<script>undefinedFunction();</script></body></html>')
    info = browser.check(page)
    assert "gone" in info["broken_images"] and "nowhere" in info["broken_anchors"]
    assert any(link.endswith("nofile.csv") for link in info["broken_links"])
    assert info["external"] == ["https://example.invalid/x.png"]
    assert any("undefinedFunction" in e["message"] for e in info["console_errors"])
    blank = tmp_path / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body></body></html>")
    browser.open(blank)
    std, colours = pixel_spread(browser.screenshot())
    assert std < 20 and colours <= 500   # what assert_not_blank rejects
