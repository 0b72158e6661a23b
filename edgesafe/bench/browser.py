"""Open a report in headless Chromium (Debian's ``chromium``, driven by Playwright; no browser download)
and say what a reader would see: every image loaded, the plots drawn, nothing failed."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import EdgesafeError

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]


@dataclass
class PageCheck:
    images: list[tuple[bool, int, str]]
    """(complete, natural width, alt) of every ``<img>``."""
    plot_widths: list[float]
    """Rendered width of every inline SVG plot."""
    summary: str
    """The summary table's text."""
    problems: list[str] = field(default_factory=list)
    """Console errors and failed requests."""

    @property
    def ok(self) -> bool:
        return not self.problems and all(done and width > 0 for done, width, _ in self.images)


def check_page(html: Path, screenshot: Path | None = None, *, chromium: Path = CHROMIUM) -> PageCheck:
    """Load ``html`` in headless Chromium; optionally save a full-page screenshot."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise EdgesafeError("checking a report in a browser needs playwright: pip install playwright") from None
    if not chromium.is_file():
        raise EdgesafeError(f"{chromium}: no Chromium (on Debian: apt-get install chromium)")
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url[:80]}"))
            page.goto(Path(html).resolve().as_uri())
            page.wait_for_load_state("load")
            images = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth, e.alt])")
            widths = page.eval_on_selector_all(".plot svg", "els => els.map(e => e.getBoundingClientRect().width)")
            summary = page.inner_text("#summary + table")
            if screenshot is not None:
                page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return PageCheck([tuple(i) for i in images], widths, summary, problems)
