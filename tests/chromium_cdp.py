"""A minimal headless-Chromium driver for tests: the DevTools protocol over `--remote-debugging-pipe`
(JSON messages separated by NUL bytes on file descriptors 3 and 4), so no port, no websocket library,
no chromedriver and no Python dependency beyond the standard library."""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_chromium() -> Optional[str]:
    """$PLIP_CHROMIUM, else the first Chromium/Chrome binary on PATH (None if there is none)."""
    env = os.environ.get("PLIP_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    return next((p for p in map(shutil.which, CANDIDATES) if p), None)


# Run in a fresh single-threaded interpreter: put the pipe ends on fds 3 and 4, then exec Chromium (no
# preexec_fn, which is unsafe in a process with threads such as JAX's; /bin/sh cannot name fds above 9).
_LAUNCH = ("import os, sys; r, w = int(sys.argv[1]), int(sys.argv[2]); a, b = os.dup(r), os.dup(w); "
           "os.dup2(a, 3); os.dup2(b, 4); os.set_inheritable(3, True); os.set_inheritable(4, True); "
           "[os.close(fd) for fd in {r, w, a, b} - {3, 4}]; "
           "os.execv(sys.argv[3], sys.argv[3:])")


class CDPError(RuntimeError):
    pass


class Chromium:
    """`with Chromium(binary) as b: b.open(url); b.eval("1+1")` — one page, commands run synchronously."""

    def __init__(self, binary: str, width: int = 1280, height: int = 1000, timeout: float = 60.0):
        self.binary, self.width, self.height, self.timeout = binary, width, height, timeout
        self.events: list = []
        self._id, self._buf, self.session = 0, b"", None

    def __enter__(self) -> "Chromium":
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()
        self._profile = tempfile.mkdtemp(prefix="plip-chromium-")
        args = ["--headless=new", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
                "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check", "--hide-scrollbars",
                "--disable-extensions", "--disable-background-networking", "--disable-component-update",
                f"--user-data-dir={self._profile}", f"--window-size={self.width},{self.height}", "about:blank"]
        self._log = open(Path(self._profile) / "chromium.log", "w")
        # Chromium reads commands on fd 3 and writes replies on fd 4
        self.proc = subprocess.Popen([sys.executable, "-c", _LAUNCH, str(to_chrome_r), str(from_chrome_w), self.binary,
                                      *args], pass_fds=(to_chrome_r, from_chrome_w), stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=self._log)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Network"):
            self.send(f"{domain}.enable")
        self.send("Emulation.setDeviceMetricsOverride", {"width": self.width, "height": self.height,
                                                         "deviceScaleFactor": 1, "mobile": False})
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.send("Browser.close", session=False)
        except Exception:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._log.close()
        shutil.rmtree(self._profile, ignore_errors=True)

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise CDPError(f"no reply from Chromium within {self.timeout} s")
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise CDPError(f"Chromium exited (code {self.proc.poll()}); log: {self._log.name}")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: Optional[dict] = None, session: Any = None) -> dict:
        """Run one protocol command on the page's session (browser-level if session=False)."""
        self._id += 1
        msg: dict = {"id": self._id, "method": method, "params": params or {}}
        sid = self.session if session is None else (None if session is False else session)
        if sid:
            msg["sessionId"] = sid
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            m = self._read_message(deadline)
            if m.get("id") == self._id:
                if "error" in m:
                    raise CDPError(f"{method}: {m['error']}")
                return m.get("result", {})
            if "method" in m:
                self.events.append(m)

    def eval(self, expression: str) -> Any:
        """Evaluate JS in the page and return its (JSON) value; a thrown exception raises CDPError."""
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in r:
            raise CDPError(f"JS error in {expression!r}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def open(self, url: str, ready: str = "document.readyState === 'complete'") -> None:
        """Navigate and wait until the JS condition `ready` holds."""
        self.send("Page.navigate", {"url": url})
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            try:
                if self.eval(ready):
                    return
            except CDPError:
                pass
            time.sleep(0.05)
        raise CDPError(f"{url}: condition {ready!r} not met within {self.timeout} s")

    def screenshot(self, path: Path, full_page: bool = False) -> Path:
        params: dict = {"format": "png"}
        if full_page:
            h = self.eval("document.documentElement.scrollHeight")
            params.update(captureBeyondViewport=True, clip={"x": 0, "y": 0, "width": self.width, "height": h, "scale": 1})
        Path(path).write_bytes(base64.b64decode(self.send("Page.captureScreenshot", params)["data"]))
        return Path(path)
