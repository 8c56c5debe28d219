"""/docs and /redoc render with no outside network: every asset is served by the API itself.

Two checks: every URL the pages reference is local and answers 200 (always), and headless Chromium
(Debian's chromium-headless-shell or chromium; skipped when absent) renders the pages with every
host but 127.0.0.1 unresolvable: Swagger UI lists the operations, ReDoc the title and the v2 paths.
"""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

pytestmark = pytest.mark.slow
BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser")


def referenced_urls(html: str) -> list[str]:
    return re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html) + re.findall(r"url:\s*'([^']+)'", html)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_every_asset_is_served_locally(http, page):
    html = http.get(page).text
    urls = referenced_urls(html)
    assert urls and any(u.endswith(".js") for u in urls), urls
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), f"{page} loads {url} from outside"
        r = http.get(url)
        assert r.status_code == 200 and len(r.content) > 0, url
    assert "cdn." not in html and "googleapis" not in html


def render(url: str) -> str:
    exe = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if exe is None:
        pytest.skip("no headless Chromium (apt-get install chromium-headless-shell)")
    out = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                          "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                          "--virtual-time-budget=15000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_swagger_ui_renders_offline(api_server):
    dom = render(f"{api_server.url}/docs")
    paths = set(re.findall(r'class="opblock-summary-path" data-path="([^"]+)"', dom))
    assert {"/predict", "/batch_predict", "/stream/{machine_id}", "/v2/models/{name}/infer"} <= paths, paths


def test_redoc_renders_offline(api_server):
    dom = render(f"{api_server.url}/redoc")
    assert re.search(r"<h1[^>]*>G-code fingerprint API", dom)
    assert "/v2/models/{name}/infer" in dom
