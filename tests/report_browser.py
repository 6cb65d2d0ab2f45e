"""A headless Chromium for the report tests, driven over the W3C WebDriver protocol (Debian's chromium-driver) with
the standard library only: chromedriver speaks JSON over HTTP, so no Selenium or websocket package is needed.

    with Browser() as b:
        b.open(path)                    # file:// URL, waits for the load event (images decoded)
        b.check()                       # broken images, anchors, links, external URLs, console errors
        png = b.screenshot(full=True)

`make test` installs chromium and chromium-driver when they are missing (Makefile: `browser`). Without them
`Browser()` raises BrowserMissing, and the tests fail rather than skip: a browser test that is skipped in CI
checks nothing.
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlparse

# Chromium in a closed network: without the background-networking flags it keeps trying to reach Google's
# services and its connections are refused; no sandbox because the tests run as root in a container.
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--hide-scrollbars", "--force-device-scale-factor=1"]

# Everything the page checks need, in one round trip.
PROBE_JS = """
const imgs = Array.from(document.images);
const anchors = Array.from(document.querySelectorAll('a[href^="#"]')).map(a => a.getAttribute('href').slice(1));
const refs = Array.from(document.querySelectorAll('[src],[href]'))
  .map(e => e.getAttribute('src') || e.getAttribute('href'));
return {
  title: document.title,
  images: imgs.length,
  broken_images: imgs.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt || i.src.slice(0, 80)),
  anchors: anchors.length,
  broken_anchors: anchors.filter(id => !id || !document.getElementById(decodeURIComponent(id))),
  links: Array.from(document.querySelectorAll('a[href]')).map(a => a.getAttribute('href'))
    .filter(h => !h.startsWith('#')).map(h => new URL(h, document.baseURI).href),
  external: refs.filter(u => /^(https?:|ftp:)?\\/\\//i.test(u)),
  scripts_external: Array.from(document.scripts).filter(s => s.src).length,
  stylesheets_external: document.querySelectorAll('link[rel=stylesheet]').length,
  cards: document.querySelectorAll('.card').length,
  height: Math.max(document.body.scrollHeight, document.documentElement.scrollHeight),
};
"""


class BrowserMissing(RuntimeError):
    pass


def find_binaries() -> tuple[str, str]:
    chrome = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not chrome or not driver:
        raise BrowserMissing("chromium and chromium-driver are not installed: `make browser` (apt-get install -y "
                             "chromium chromium-driver) installs them; `make test` does it first")
    return chrome, driver


# chromedriver listens on the loopback interface: never through a proxy. (urlopen's global opener keeps the proxy
# settings of the first request of the process, which may have been made by a test that points them at a dead proxy.)
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Browser:
    def __init__(self, width: int = 1280, height: int = 900, timeout: float = 60.0):
        chrome, driver = find_binaries()
        self.profile = tempfile.mkdtemp(prefix="report-chromium-")
        self.timeout = timeout
        self.size = (width, height)
        self.session = None
        self.proc = None
        try:
            self._start_driver(driver)
            caps = {"capabilities": {"alwaysMatch": {
                "browserName": "chrome", "pageLoadStrategy": "normal",
                "goog:loggingPrefs": {"browser": "ALL"},
                "goog:chromeOptions": {"binary": chrome,
                                       "args": FLAGS + [f"--user-data-dir={self.profile}",
                                                        f"--window-size={width},{height}"]}}}}
            self.session = self._call("POST", "/session", caps)["sessionId"]
        except BaseException:
            self.close()
            raise

    # ----- the protocol ---------------------------------------------------------------------------------------
    def _call(self, method: str, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with _LOCAL.open(req, timeout=self.timeout) as resp:
                return json.loads(resp.read() or b"{}").get("value")
        except urllib.error.HTTPError as err:
            raise RuntimeError(f"WebDriver {method} {path}: {err.read()[:500]!r}") from err

    def _start_driver(self, driver: str, attempts: int = 3) -> None:
        """chromedriver on a free port; should the port be taken between choosing and binding it (the suite
        starts DDP rendezvous and loopback servers beside these tests), another port is tried."""
        for attempt in range(attempts):
            self.port = _free_port()
            self.driver_log = Path(self.profile) / f"chromedriver-{attempt}.log"
            with open(self.driver_log, "wb") as log_file:
                self.proc = subprocess.Popen([driver, f"--port={self.port}"], stdout=log_file,
                                             stderr=subprocess.STDOUT)
            if self._wait_ready(deadline=time.time() + self.timeout / attempts):
                return
            self.proc.kill()
            self.proc.wait()
        tail = self.driver_log.read_text(errors="replace")[-1500:]
        raise RuntimeError(f"chromedriver did not start ({attempts} ports tried, {self.timeout:.0f} s); its last "
                           f"output:\n{tail}")

    def _wait_ready(self, deadline: float) -> bool:
        while time.time() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{self.port}/status")
                with _LOCAL.open(req, timeout=2.0) as resp:
                    if (json.loads(resp.read() or b"{}").get("value") or {}).get("ready"):
                        return True
            except (OSError, ValueError, AttributeError):
                pass
            time.sleep(0.1)
        return False

    def _s(self, path: str) -> str:
        return f"/session/{self.session}{path}"

    # ----- what the tests use ------------------------------------------------------------------------------
    def open(self, path: Path | str) -> None:
        url = path if str(path).startswith(("file:", "http:")) else Path(path).resolve().as_uri()
        self.resize(*self.size)   # a full-page screenshot grew the window; a page's height is measured in this one
        self._call("POST", self._s("/url"), {"url": url})

    def script(self, js: str, *args):
        return self._call("POST", self._s("/execute/sync"), {"script": js, "args": list(args)})

    def console(self) -> list[dict]:
        """Browser console entries since the last call (level, message)."""
        return self._call("POST", self._s("/se/log"), {"type": "browser"}) or []

    def resize(self, width: int, height: int) -> None:
        self._call("POST", self._s("/window/rect"), {"width": width, "height": height})

    def screenshot(self, full: bool = False, max_height: int = 16000) -> bytes:
        """PNG of the viewport, or of the whole page (the window grown to the page's height)."""
        import base64
        if full:
            h = int(self.script("return Math.max(document.body.scrollHeight, "
                                "document.documentElement.scrollHeight)"))
            w = int(self.script("return window.outerWidth"))
            self.resize(w, min(max_height, h + 20))
        return base64.b64decode(self._call("GET", self._s("/screenshot")))

    def probe(self) -> dict:
        return self.script(PROBE_JS)

    def check(self, page: Path) -> dict:
        """Loads `page` and returns the probe plus every problem found (empty lists when the page is sound):
        broken images and anchors, links to files that do not exist, any external URL, console errors."""
        self.console()  # drop what earlier pages logged
        self.open(page)
        info = self.probe()
        missing = []
        for link in info["links"]:
            u = urlparse(link)
            if u.scheme == "file":
                target = Path(unquote(u.path))
                if not target.exists():
                    missing.append(str(target))
            elif u.scheme not in ("data",):
                missing.append(link)
        info["broken_links"] = missing
        info["console_errors"] = [e for e in self.console() if e.get("level") in ("SEVERE", "ERROR")]
        return info

    def close(self) -> None:
        if self.session:
            try:
                self._call("DELETE", self._s(""))
            except Exception:  # noqa: BLE001 - closing anyway
                pass
            self.session = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def pixel_spread(png: bytes) -> tuple[float, int]:
    """(standard deviation of the grey levels, number of distinct colours) of a screenshot: a blank or failed page
    is one flat colour."""
    import io

    from PIL import Image, ImageStat
    with Image.open(io.BytesIO(png)) as im:
        rgb = im.convert("RGB")
        std = ImageStat.Stat(rgb.convert("L")).stddev[0]
        colours = len(rgb.getcolors(maxcolors=1 << 20) or [])
    return std, colours
