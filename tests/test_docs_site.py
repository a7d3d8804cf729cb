"""The documentation site: `mkdocs build --strict` passes (a broken link or anchor, or a page left
out of the navigation, fails it), and the built site works in headless Chromium: the home page,
the configuration reference and a how-to render with their navigation and search box, and a
search finds a config key.

The browser test is slow (`make test-all`); it serves the built site with `python -m
http.server` on a free port of 127.0.0.1 (the search index is fetched, so file:// would not do),
stops it by PID, and leaves its screenshots in its temporary folder (and in
$TRIMFLOW_DOCS_SCREENSHOTS when that is set).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import headless_chromium

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 60


def build_site(site: Path) -> subprocess.CompletedProcess:
    """`mkdocs build --strict` of this checkout into `site`."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict"]
        + ["--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_site_builds_with_strict_checks(tmp_path):
    result = build_site(tmp_path / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    site = tmp_path / "site"
    for page in (
        "index.html",
        "reference/configuration/index.html",
        "reference/cli/index.html",
        "how-to/own-data/index.html",
        "explanations/benchmarks/index.html",
        "search/search_index.json",
        "assets/quality_vs_latency.png",
    ):
        assert (site / page).exists(), page


def test_a_broken_link_fails_the_strict_build(tmp_path):
    docs = tmp_path / "project"
    shutil.copytree(ROOT / "docs", docs / "docs")
    shutil.copy(ROOT / "mkdocs.yml", docs / "mkdocs.yml")
    (docs / "docs/index.md").write_text(
        (docs / "docs/index.md").read_text() + "\n[gone](how-to/no-such-page.md)\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict"]
        + ["--site-dir", str(tmp_path / "site")],
        cwd=docs,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "no-such-page.md" in result.stdout + result.stderr


def _executable(name: str) -> str | None:
    """`name` on PATH, else Debian's /usr/bin/`name`; None when neither is executable."""
    path = shutil.which(name) or f"/usr/bin/{name}"
    return path if os.access(path, os.X_OK) else None


@pytest.fixture(scope="module")
def served_site(tmp_path_factory):
    """The built site served by `python -m http.server` on a free port of 127.0.0.1."""
    root = tmp_path_factory.mktemp("docs-site")
    result = build_site(root / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    server = subprocess.Popen(
        [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1"]
        + ["--directory", str(root / "site")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = server.stdout.readline()  # Serving HTTP on 127.0.0.1 port 41234 (...)
        port = re.search(r"port (\d+)", line)
        assert port, f"http.server said {line!r}"
        yield f"http://127.0.0.1:{port[1]}", root
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture(scope="module")
def browser(served_site):
    """Headless Chromium driven by Debian's chromedriver."""
    chromium, chromedriver = _executable("chromium"), _executable("chromedriver")
    if not chromium or not chromedriver:
        pytest.skip("chromium or chromedriver not installed: `make chromium` installs them")
    pytest.importorskip("selenium.webdriver")
    _, root = served_site
    # wide enough for the navigation tabs
    with headless_chromium(
        chromium, chromedriver, "1400,1000", root / "chromedriver.log", TIMEOUT_S
    ) as driver:
        yield driver


def _screenshot(driver, root: Path, name: str) -> Path:
    """Save the window to `root`/`name`.png, and to $TRIMFLOW_DOCS_SCREENSHOTS if set."""
    path = root / f"{name}.png"
    driver.save_screenshot(str(path))
    if folder := os.environ.get("TRIMFLOW_DOCS_SCREENSHOTS"):
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(folder) / path.name)
    return path


PAGES = {
    "home": ("", "trimflow"),
    "configuration": ("reference/configuration/", "Configuration reference"),
    "how-to": ("how-to/own-data/", "Use your own data"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PAGES))
def test_the_page_renders_with_navigation_and_search(served_site, browser, name):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, root = served_site
    path, title = PAGES[name]
    browser.get(f"{url}/{path}")
    wait = WebDriverWait(browser, TIMEOUT_S)
    heading = wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, "article h1")))
    assert heading.text.strip().rstrip("¶").strip() == title
    tabs = browser.find_elements(By.CSS_SELECTOR, ".md-tabs__link")
    assert {"How-to guides", "Reference", "Explanations"} <= {t.text.strip() for t in tabs}
    assert browser.find_elements(By.CSS_SELECTOR, "nav.md-nav--primary a.md-nav__link")
    assert browser.find_element(By.CSS_SELECTOR, "input.md-search__input")
    if name == "home":  # the default run's plot, taken from reports/plots/ at build time
        image = browser.find_element(By.CSS_SELECTOR, "img[src$='quality_vs_latency.png']")
        assert browser.execute_script("return arguments[0].naturalWidth", image) > 100
    if name == "configuration":
        cells = browser.find_elements(By.CSS_SELECTOR, "article table td code")
        assert "distill.students.<name>.layer_fraction" in {c.text for c in cells}
    _screenshot(browser, root, name)


@pytest.mark.slow
def test_search_finds_a_config_key(served_site, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, root = served_site
    browser.get(f"{url}/")
    wait = WebDriverWait(browser, TIMEOUT_S)
    box = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "input.md-search__input")))
    box.click()
    box.send_keys("layer_fraction")
    results = wait.until(
        ec.visibility_of_all_elements_located((By.CSS_SELECTOR, "li.md-search-result__item"))
    )
    assert results
    texts = " ".join(r.text for r in results)
    assert "layer_fraction" in texts or "Configuration reference" in texts
    _screenshot(browser, root, "search")
