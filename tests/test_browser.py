"""End to end in a real browser: Debian's headless Chromium, driven by Playwright, against the
service on loopback. Upload a bundled scan on the page and read the predicted class off it.

Playwright cannot download its own browser here, so it drives ``/usr/bin/chromium`` (Debian's
``chromium`` package, which ``.ci/run`` installs). Without it the test is skipped, unless
``BRAINTUMOR_REQUIRE_BROWSER=1`` (set by CI) makes a missing browser a failure. Screenshots go
to ``BRAINTUMOR_SCREENSHOT_DIR`` when set.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from braintumor.inference.predict import load_model
from braintumor.pacs.sample import write_series
from braintumor.serving.app import create_app
from conftest import EXAMPLES, live_server

pytestmark = pytest.mark.slow  # subprocesses, servers or the real data: minutes of CPU in all

CHROMIUM = Path(os.environ.get("BRAINTUMOR_CHROMIUM", "/usr/bin/chromium"))
# Without the background-networking flags Chromium keeps trying to reach Google on a closed network.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        if os.environ.get("BRAINTUMOR_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{CHROMIUM} is missing; install Debian's chromium package")
        pytest.skip(f"{CHROMIUM} is not installed")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield instance
        instance.close()


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    """One service, with the shipped model, for every page of this module."""
    with live_server(create_app(load_model(device="cpu"))) as served:
        yield served


@pytest.mark.parametrize(
    "viewport", [{"width": 1280, "height": 800}, {"width": 390, "height": 844}], ids=["laptop", "phone"]
)
def test_upload_a_scan_and_read_the_predicted_class(browser, url: str, viewport: dict, tmp_path: Path) -> None:
    scan = EXAMPLES / "pituitary" / "Te-pi_0017.jpg"
    page = browser.new_page(viewport=viewport)
    page.goto(url + "/")
    # A locator wait, not wait_for_function: the page's CSP forbids eval, which that would need.
    page.locator("#model").filter(has_text="Testing accuracy").wait_for(timeout=30_000)
    page.set_input_files("#files", str(scan))
    card = page.locator(".result").first
    card.locator("[data-testid=label]").wait_for(timeout=60_000)
    assert card.locator("h2").inner_text() == scan.name
    assert card.locator("[data-testid=label]").inner_text() == "pituitary"
    assert card.locator(".bar").count() == 4
    images = card.locator("img")
    assert images.count() == 2 and all(images.nth(k).evaluate("i => i.naturalWidth > 0") for k in range(2))
    shots = Path(os.environ.get("BRAINTUMOR_SCREENSHOT_DIR", tmp_path))  # docs/serving/ holds committed ones
    page.screenshot(path=str(shots / f"page-{viewport['width']}.png"), full_page=True)
    page_width = page.evaluate("document.documentElement.scrollWidth")
    assert page_width <= viewport["width"]  # nothing overflows sideways on a phone
    dropped = EXAMPLES / "glioma" / "Te-gl_0010.jpg"  # drag and drop, as from a file manager
    transfer = page.evaluate_handle(
        """([name, b64]) => { const data = new DataTransfer();
             const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
             data.items.add(new File([bytes], name, {type: "image/jpeg"})); return data; }""",
        [dropped.name, base64.b64encode(dropped.read_bytes()).decode()],
    )
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
    card = page.locator(".result").first
    card.locator("[data-testid=label]").wait_for(timeout=60_000)
    assert card.locator("h2").inner_text() == dropped.name
    assert card.locator("[data-testid=label]").inner_text() == "glioma"
    page.set_input_files("#files", {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not a scan"})
    error = page.locator(".result").first.locator("[data-testid=error]")
    error.wait_for(timeout=30_000)
    assert "unsupported file type" in error.inner_text()
    # a colour picture of a scan: refused, with the reason
    grey = np.asarray(Image.open(scan).convert("L"), dtype=np.float32)
    tinted = io.BytesIO()
    Image.fromarray(np.stack([grey, grey * 0.55, grey * 0.2], axis=2).astype(np.uint8)).save(tinted, format="PNG")
    page.set_input_files("#files", {"name": "tinted.png", "mimeType": "image/png", "buffer": tinted.getvalue()})
    flag = page.locator(".result").first.locator("[data-testid=ood]")
    flag.wait_for(timeout=60_000)
    assert "colour picture" in flag.inner_text()
    page.close()


GLIOMA_SERIES = [EXAMPLES / "notumor" / "Te-no_0229.jpg", EXAMPLES / "glioma" / "Te-glTr_0006.jpg",
                 EXAMPLES / "glioma" / "Te-gl_0010.jpg", EXAMPLES / "notumor" / "Te-no_0292.jpg"]


@pytest.mark.parametrize(
    "viewport", [{"width": 1280, "height": 800}, {"width": 390, "height": 844}], ids=["laptop", "phone"]
)
def test_several_dicom_files_show_the_series_verdict_key_slices_and_slice_table(
    browser, url: str, viewport: dict, tmp_path: Path
) -> None:
    files = write_series(GLIOMA_SERIES, tmp_path / "series")  # in anatomical order; sent shuffled
    page = browser.new_page(viewport=viewport)
    page.goto(url + "/")
    page.locator("#model").filter(has_text="Testing accuracy").wait_for(timeout=30_000)
    page.set_input_files("#files", [str(p) for p in (files[2], files[0], files[3], files[1])])
    card = page.locator("[data-testid=series]").first
    card.locator("[data-testid=series-verdict]").wait_for(timeout=60_000)
    assert card.locator("[data-testid=series-verdict]").inner_text() == "glioma"
    assert "adjacent confident slices (1, 2)" in card.locator("[data-testid=series-reason]").inner_text()
    assert "Key slices: 1, 2" in card.locator("[data-testid=key-slices]").inner_text()
    rows = card.locator("[data-testid=slice-table] tr")
    assert rows.count() == 5  # a header and the four slices, in anatomical order
    assert [rows.nth(k).locator("td").nth(1).inner_text() for k in range(1, 5)] == [p.name for p in files]
    assert card.locator("tr.key").count() == 2
    pictures = card.locator("[data-testid=key-pictures] img")
    pictures.nth(1).wait_for(timeout=60_000)  # one heat map per key slice
    assert all(pictures.nth(k).evaluate("i => i.complete && i.naturalWidth > 0") for k in range(2))
    shots = Path(os.environ.get("BRAINTUMOR_SCREENSHOT_DIR", tmp_path))
    page.screenshot(path=str(shots / f"series-{viewport['width']}.png"), full_page=True)
    assert page.evaluate("document.documentElement.scrollWidth") <= viewport["width"]
    page.close()


def test_a_study_with_repeated_file_names_and_a_broken_file_keeps_each_result_with_its_file(
    browser, url: str, tmp_path: Path
) -> None:
    """Files of one name from different folders (SE1/IM1, SE2/IM1) never lend each other a heat map,
    and a file that belongs to no series still gets its own card with its reason."""
    files = write_series(GLIOMA_SERIES, tmp_path / "series")
    broken = files[0].read_bytes()[:-5000]
    uploads = [{"name": "IM1.dcm", "mimeType": "application/dicom", "buffer": p.read_bytes()} for p in files[::-1]]
    uploads.append({"name": "broken.dcm", "mimeType": "application/dicom", "buffer": broken})
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.goto(url + "/")
    page.locator("#model").filter(has_text="Testing accuracy").wait_for(timeout=30_000)
    page.set_input_files("#files", uploads)
    card = page.locator("[data-testid=series]").first
    card.locator("[data-testid=series-verdict]").wait_for(timeout=60_000)
    assert card.locator("[data-testid=series-verdict]").inner_text() == "glioma"
    assert card.locator("[data-testid=slice-table] tr").count() == 5
    captions = card.locator("[data-testid=key-pictures] figcaption")
    captions.nth(1).wait_for(timeout=60_000)
    assert all("glioma" in captions.nth(k).inner_text() for k in range(2))  # the key slices' own pictures
    error = page.locator("[data-testid=error]").first
    assert "broken.dcm" in error.inner_text() and "cannot decode" in error.inner_text()
    page.close()
