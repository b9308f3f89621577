"""A real headless Chromium driven over the DevTools protocol (`--remote-debugging-pipe`, stdlib only): open
/docs offline, fill the /v1/query "Try it out" form, press Execute and read what Swagger UI shows.

Also a script: `python tests/browser.py URL OUT.png` saves a screenshot of the executed query."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["chromium", "Browser", "try_query_in_docs", "DocsRun"]

QUERY_OPERATION = "operations-query-query_v1_query_post"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--remote-debugging-pipe",
]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """One Chromium process and one page; commands are JSON messages ending in NUL on fds 3 (in) and 4 (out)."""

    def __init__(self, binary: str, width: int = 1280, height: int = 1600) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        # move the child's ends out of the way of 3 and 4 before dup2 puts them there
        high_in = fcntl.fcntl(to_child_r, fcntl.F_DUPFD, 10)
        high_out = fcntl.fcntl(from_child_w, fcntl.F_DUPFD, 10)

        def child_fds() -> None:
            os.dup2(high_in, 3)
            os.dup2(high_out, 4)

        self.proc = subprocess.Popen(
            [binary, *FLAGS, f"--window-size={width},{height}", "about:blank"],
            preexec_fn=child_fds,
            pass_fds=(3, 4),  # kept open through exec: the children dup2 the pipes onto them first
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for fd in (to_child_r, from_child_w, high_in, high_out):
            os.close(fd)
        self._out = os.fdopen(to_child_w, "wb")
        self._in = os.fdopen(from_child_r, "rb")
        self._buf = b""
        self._next_id = 0
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                          "mobile": False}, session=True)  # fmt: skip

    def _read(self) -> dict[str, Any]:
        while b"\0" not in self._buf:
            chunk = os.read(self._in.fileno(), 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buf += chunk
        msg, _, self._buf = self._buf.partition(b"\0")
        return json.loads(msg)

    def call(self, method: str, params: dict[str, Any] | None = None, session: bool = False) -> dict[str, Any]:
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        self._out.write(json.dumps(msg).encode() + b"\0")
        self._out.flush()
        while True:
            reply = self._read()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def evaluate(self, expression: str) -> Any:
        r = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"page script failed: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.2)
        raise TimeoutError(f"waited {timeout:g}s for {expression}")

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"}, session=True)["data"])

    def close(self) -> None:
        with contextlib.suppress(RuntimeError):
            self.call("Browser.close")
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._out.close()
        self._in.close()


@dataclass(frozen=True)
class DocsRun:
    status: str  # the HTTP status Swagger UI shows for the executed request
    body: dict[str, Any]  # the response body it shows
    failed_requests: list[str]  # resources the page could not load (a CDN reference would show up here)
    screenshot: bytes


def try_query_in_docs(base_url: str, body: dict[str, Any], binary: str | None = None) -> DocsRun:
    """Opens /docs, fills the query operation's request body, presses Execute, reads the shown response."""
    browser = Browser(binary or chromium() or "chromium")
    try:
        browser.call("Page.enable", session=True)
        browser.call("Page.navigate", {"url": f"{base_url}/docs#/query/query_v1_query_post"}, session=True)
        op = f"document.getElementById('{QUERY_OPERATION}')"
        browser.wait_for(f"!!({op} && {op}.querySelector('textarea.body-param__text'))")
        text = json.dumps(json.dumps(body, indent=2))
        browser.evaluate(
            f"""(() => {{
              const ta = {op}.querySelector('textarea.body-param__text');
              const set = Object.getOwnPropertyDescriptor(HTMLTextAreaElement.prototype, 'value').set;
              set.call(ta, {text});
              ta.dispatchEvent(new Event('input', {{bubbles: true}}));
              ta.dispatchEvent(new Event('change', {{bubbles: true}}));
              ta.blur();
            }})()"""
        )
        time.sleep(0.3)  # let React commit the edited value before the click reads it
        browser.evaluate(f"{op}.querySelector('button.execute').click()")
        status = browser.wait_for(
            f"(() => {{ const c = {op}.querySelector('.live-responses-table tbody .response-col_status');"
            " return c ? c.textContent.trim() : ''; })()"
        )
        shown = browser.wait_for(f"(() => {{ const b = {op}.querySelector('.live-responses-table .microlight');"
                                 " return b ? b.textContent : ''; })()")  # fmt: skip
        failed = browser.evaluate(
            "performance.getEntriesByType('resource').filter(e => e.responseStatus >= 400 || "
            "(e.transferSize === 0 && e.decodedBodySize === 0 && !e.name.startsWith(location.origin)))"
            ".map(e => e.name)"
        )
        browser.evaluate(f"{op}.querySelector('.live-responses-table').scrollIntoView({{block: 'center'}})")
        time.sleep(0.3)
        return DocsRun(status.split()[0], json.loads(shown), list(failed or []), browser.screenshot())
    finally:
        browser.close()


if __name__ == "__main__":
    url, out = sys.argv[1], Path(sys.argv[2])
    run = try_query_in_docs(url, {"target": {"label": 2}, "k": 5})
    out.write_bytes(run.screenshot)
    print(f"status {run.status}, {len(run.body.get('clusters', []))} clusters, failed loads {run.failed_requests}")
