"""The HTML report of a batch: what it shows, and that a real browser renders it."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from medgemma_cli.answering import AskOptions
from medgemma_cli.batch import run_batch

pytestmark = pytest.mark.slow


def test_html_report(messy, convert_tiny, tmp_path):
    """The report is one self-contained file: each unit's thumbnail decodes as an image, answers and errors are
    there and escaped, and nothing is fetched from elsewhere."""
    import base64
    import io
    from html.parser import HTMLParser

    from medgemma_cli.batch.report import write_report

    out = tmp_path / "r.jsonl"
    run_batch(messy, ["Size <5 mm & shape?"], out, model=convert_tiny("Q8_0"), options=AskOptions(max_tokens=4))
    report = write_report(out, tmp_path / "review.html")
    page = report.read_text()

    class Collect(HTMLParser):
        def __init__(self):
            super().__init__()
            self.imgs, self.sections, self.external = [], 0, []

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "img":
                self.imgs.append(a["src"])
            if tag == "section":
                self.sections += 1
            for key in ("src", "href"):
                if a.get(key, "").startswith(("http:", "https:", "//")):
                    self.external.append(a[key])

    c = Collect()
    c.feed(page)
    assert c.sections == 6 and not c.external
    assert len(c.imgs) == 5  # every unit but the broken one has what the model saw
    for src in c.imgs:
        img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert img.height == 160 and img.width % 160 == 0
    assert "Size &lt;5 mm &amp; shape?" in page and "<5 mm" not in page
    assert page.count('class="unit err"') == 1 and "broken.dcm" in page


# --- --classify: MedSigLIP probabilities per unit -------------------------------------------------------------


def _working_chromium() -> str | None:
    """A headless Chromium that really starts (a snap wrapper inside a container does not)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            try:
                r = subprocess.run([path, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", "about:blank"],
                                   capture_output=True, text=True, timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                continue
            if r.returncode == 0 and "<html" in r.stdout:
                return path
    return None


CHROMIUM = _working_chromium()


@pytest.mark.skipif(CHROMIUM is None, reason="no working Chromium on this machine; test_html_report checks the "
                                             "page's structure and images without a browser")
def test_report_renders_in_chromium(convert_tiny, tmp_path):
    """Debian's headless Chromium opens the report offline and paints each unit's thumbnail: a red and a blue
    scan must show up as red and blue squares of the thumbnail's size in the screenshot."""
    root = tmp_path / "colours"
    root.mkdir()
    Image.fromarray(np.tile(np.array([220, 20, 20], np.uint8), (48, 48, 1))).save(root / "red.png")
    Image.fromarray(np.tile(np.array([20, 20, 220], np.uint8), (48, 48, 1))).save(root / "blue.png")
    out = tmp_path / "r.jsonl"
    run_batch(root, ["Findings?"], out, model=convert_tiny("Q8_0"), options=AskOptions(max_tokens=3))
    from medgemma_cli.batch.report import write_report

    report = write_report(out, tmp_path / "review.html")
    shot = tmp_path / "shot.png"
    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,1200",
                        f"--screenshot={shot}", report.as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.is_file(), r.stderr[-2000:]
    px = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    red = (px[..., 0] > 180) & (px[..., 1] < 70) & (px[..., 2] < 70)
    blue = (px[..., 2] > 180) & (px[..., 0] < 70) & (px[..., 1] < 70)
    assert red.sum() >= 0.9 * 160 * 160 and blue.sum() >= 0.9 * 160 * 160, (red.sum(), blue.sum())
    rows = np.flatnonzero(red.any(axis=1))
    assert 150 <= rows[-1] - rows[0] + 1 <= 170  # one thumbnail tall, as laid out
