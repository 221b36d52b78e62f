"""The HTML report in a real browser: headless Chromium driven by chromedriver.

Every image and inline SVG must render (``naturalWidth > 0`` for an ``<img>``, a non-empty
bounding box for an ``<svg>``), the console must stay free of errors, and the status and
text filters must hide what they say. chromedriver speaks the W3C WebDriver protocol (JSON
over HTTP), so a few lines of urllib drive it: no Python dependency is added.

Runs on a cheap report (three small targets, every figure kind) and on the bundled digits
model (``routeaudit run fixtures/digits/block_adapter.py --seeds 0``; about 25 s).
``ROUTEAUDIT_UPDATE_SCREENSHOT=1`` also writes the digits report's full-page screenshot to
``docs/digits-report.png``.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import shutil
import socket
import struct
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from routeaudit.cli import main

REPO = Path(__file__).resolve().parents[1]
WIDTH = 1200
MISSING = ("headless Chromium is not installed: install Debian packages chromium and "
           "chromium-driver (apt-get install -y chromium chromium-driver)")


def _find(*names: str) -> str | None:
    return next((path for name in names if (path := shutil.which(name))), None)


CHROME = _find("chromium", "chromium-browser", "google-chrome")
DRIVER = _find("chromedriver")
pytestmark = pytest.mark.skipif(CHROME is None or DRIVER is None, reason=MISSING)


class Browser:
    """One chromedriver process and one headless session, over plain HTTP."""

    def __init__(self, driver: str, chrome: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([driver, f"--port={port}"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                if self._call("GET", "/status")["ready"]:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.proc.kill()
                raise RuntimeError("chromedriver did not start")
            time.sleep(0.1)
        caps = {"browserName": "chrome", "goog:loggingPrefs": {"browser": "ALL"},
                "goog:chromeOptions": {"binary": chrome, "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--hide-scrollbars", f"--window-size={WIDTH},900"]}}
        try:
            session = self._call("POST", "/session", {"capabilities": {"alwaysMatch": caps}})
        except Exception:
            self.proc.kill()
            raise
        self.session = f"/session/{session['sessionId']}"

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return json.loads(resp.read())["value"]
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"{method} {path}: {exc.read()[:500]!r}") from exc

    def cmd(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return self._call(method, self.session + path, body)

    def open(self, path: Path) -> None:
        self.cmd("POST", "/url", {"url": path.resolve().as_uri()})

    def js(self, script: str, *args: Any) -> Any:
        return self.cmd("POST", "/execute/sync", {"script": script, "args": list(args)})

    def console(self) -> list[dict[str, Any]]:
        """Browser console entries since the last call (chromedriver's log endpoint)."""
        return self.cmd("POST", "/se/log", {"type": "browser"})

    def screenshot(self) -> bytes:
        """The whole page, not just the window (Chrome DevTools, through chromedriver)."""
        size = self.js("return [document.documentElement.scrollWidth, "
                       "document.documentElement.scrollHeight]")
        shot = self.cmd("POST", "/goog/cdp/execute", {"cmd": "Page.captureScreenshot", "params": {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size[0], "height": size[1], "scale": 1}}})
        return base64.b64decode(shot["data"])

    def close(self) -> None:
        try:
            self.cmd("DELETE", "")
        finally:
            self.proc.terminate()
            self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def browser():
    b = Browser(DRIVER, CHROME)  # type: ignore[arg-type]
    yield b
    b.close()


RENDERED = """
const imgs = Array.from(document.images).map(i => [i.complete, i.naturalWidth]);
const svgs = Array.from(document.querySelectorAll('svg')).map(s => {
  const b = s.getBBox(), r = s.getBoundingClientRect();
  return [s.getAttribute('data-fig'), b.width, b.height, r.width, r.height];
});
return {imgs: imgs, svgs: svgs, rows: document.querySelectorAll('tr.v').length};
"""

VISIBLE_ROWS = """
return Array.from(document.querySelectorAll('tr.v')).filter(r => r.offsetParent !== null)
  .map(r => r.className);
"""


def check_page(browser: Browser, page: Path) -> dict[str, Any]:
    """Load ``page``; assert every image and SVG renders and the console has no error."""
    browser.console()  # drop earlier entries
    browser.open(page)
    got = browser.js(RENDERED)
    assert all(complete and width > 0 for complete, width in got["imgs"]), got["imgs"]
    assert got["svgs"], "no figure rendered"
    empty = [s for s in got["svgs"] if not (s[1] > 0 and s[2] > 0 and s[3] > 0 and s[4] > 0)]
    assert not empty, empty
    errors = [e for e in browser.console() if e.get("level") in ("SEVERE", "ERROR")]
    assert not errors, errors
    return got


def check_filters(browser: Browser) -> None:
    everything = browser.js(VISIBLE_ROWS)
    assert any("st-pass" in c for c in everything)
    browser.js("document.querySelector(\"label[for='f-pass']\").click()")
    shown = browser.js(VISIBLE_ROWS)
    assert shown and not any("st-pass" in c for c in shown)
    assert len(shown) == sum("st-pass" not in c for c in everything)
    browser.js("document.querySelector(\"label[for='f-pass']\").click()")
    assert browser.js(VISIBLE_ROWS) == everything
    # the text filter: type an audit name, only its rows stay
    browser.js("const q = document.getElementById('q'); q.value = 'causal_ablation';"
               "q.dispatchEvent(new Event('input'));")
    shown = browser.js("return Array.from(document.querySelectorAll('tr.v'))"
                       ".filter(r => r.offsetParent !== null).map(r => r.textContent)")
    assert shown and all("causal_ablation" in t for t in shown)


def test_cheap_report_renders_in_chromium(browser, tmp_path):
    """Every figure kind (the fixture of test_html_report) in the browser; about 2 s."""
    from routeaudit.simulation.experts import generate_moe

    unit = _unit_tests()
    (tmp_path / "cal_adapter.py").write_text(unit.CAL_ADAPTER)
    (tmp_path / "toy_model.py").write_text(unit.TOY_MODEL)
    generate_moe("soft", 4000, seed=0, truth=False).save_npz(tmp_path / "moe.npz")
    page = tmp_path / "report.html"
    args = ["run", str(tmp_path / "cal_adapter.py"), str(tmp_path / "moe.npz"),
            str(tmp_path / "toy_model.py"), "--seeds", "0,1", "--permutations", "199",
            "--bootstrap", "100", "--no-cache", "-q", "--html", str(page)]
    for audit in unit.AUDITS:
        args += ["--audit", audit]
    assert main(args) in (0, 1)
    got = check_page(browser, page)
    assert set(unit.KINDS) <= {s[0] for s in got["svgs"]}
    check_filters(browser)


def _unit_tests() -> Any:
    """tests/test_html_report.py as a module (its fixture targets), loaded by path."""
    spec = importlib.util.spec_from_file_location("_html_report_cases",
                                                  Path(__file__).with_name("test_html_report.py"))
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_digits_report_renders_in_chromium(browser, tmp_path):
    page = tmp_path / "digits.html"
    code = main(["run", str(REPO / "fixtures" / "digits" / "block_adapter.py"), "--seeds", "0",
                 "--cache-dir", str(tmp_path / "cache"), "-q", "--html", str(page)])
    assert code == 1  # the README's outcome: fails and inconclusives
    got = check_page(browser, page)
    kinds = {s[0] for s in got["svgs"]}
    assert {"reliability", "null", "gain-ece", "gain", "causal"} <= kinds
    check_filters(browser)
    browser.open(page)  # unfiltered again
    shot = browser.screenshot()
    width, height = _png_size(shot)
    assert width == WIDTH and height > 2000
    if os.environ.get("ROUTEAUDIT_UPDATE_SCREENSHOT") == "1":
        _save_docs_png(shot, REPO / "docs" / "digits-report.png")


def _save_docs_png(shot: bytes, target: Path) -> None:
    """The screenshot, as a palette PNG when Pillow is there (a tenth of the size)."""
    try:
        import io

        from PIL import Image

        img = Image.open(io.BytesIO(shot)).convert("RGB").quantize(colors=256, dither=0)
        buf = io.BytesIO()
        img.save(buf, format="PNG", optimize=True)
        shot = buf.getvalue()
    except ImportError:
        pass
    assert len(shot) < 1_000_000, f"screenshot is {len(shot)} bytes"
    target.write_bytes(shot)
