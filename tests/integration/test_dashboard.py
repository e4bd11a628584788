"""The dashboard in a real headless Chromium (Debian's), driven by Playwright: it shows live numbers."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.helpers import BackgroundClient

pytestmark = pytest.mark.slow

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome")


def _find_chromium() -> str | None:
    for name in CHROMIUM_CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium; installed with apt when this runs as root and it is missing."""
    path = _find_chromium()
    if path is None and shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        try:
            subprocess.run(["apt-get", "update", "-qq"], check=True, timeout=600, env=env, capture_output=True)
            subprocess.run(
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"],
                check=True,
                timeout=900,
                env=env,
                capture_output=True,
            )
        except (subprocess.SubprocessError, OSError) as exc:
            pytest.skip(f"Chromium is not installed and apt-get could not install it: {exc}")
        path = _find_chromium()
    if path is None:
        pytest.skip("no Chromium on this machine (install Debian's 'chromium' package to run this test)")
    return path


def test_dashboard_shows_live_numbers(cluster, chromium: str) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is part of the test extra")
    server = cluster.start("--demand-window-s", "1")
    # A client streams until the page has been checked, so the numbers it shows are live.
    with BackgroundClient(server.data, epochs=None, batch_size=8, image_size=64) as client:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=chromium,
                args=[
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--no-first-run",
                ],
            )
            try:
                page = browser.new_page()
                console_errors: list[str] = []
                page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
                page.goto(server.http + "/", timeout=30000)
                # Live throughput: a positive images/s figure, a client row, workers alive.
                page.wait_for_function(
                    "() => parseFloat(document.getElementById('images-per-s').textContent) > 0", timeout=30000
                )
                page.wait_for_function("() => document.querySelectorAll('#clients tr td').length >= 9", timeout=30000)
                assert page.text_content("#state") == "serving"
                assert page.text_content("#workers-alive") == "2 / 2"
                assert "%" in page.text_content("#stall-share")
                assert "max_prefetch" in page.text_content("#config")
                # Running by demand: the desired sizes and each job's verdict line.
                page.wait_for_function(
                    "() => /-bound: /.test(document.getElementById('jobs').textContent)", timeout=30000
                )
                assert int(page.text_content("#desired-workers")) >= 1
                assert int(page.text_content("#desired-replicas")) >= 1
                first = float(page.text_content("#images-per-s"))
                assert first > 0
                # The chart gets drawn once two polls are in: canvas pixels stop being transparent.
                page.wait_for_function(
                    "() => { const c = document.getElementById('chart');"
                    " const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
                    " let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n > 100; }",
                    timeout=30000,
                )
                assert not console_errors, console_errors
            finally:
                browser.close()
        client.stop()
        client.result(60)
