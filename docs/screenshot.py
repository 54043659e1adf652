"""Make docs/serve.png: upload IMAGE to a running `retrieval serve` at URL and screenshot it.

    retrieval serve INDEX --port 8765 &
    python docs/screenshot.py http://127.0.0.1:8765/ QUERY.jpg docs/serve.png --k 8

Uses the system's Chromium (or $RETRIEVAL_CHROMIUM). The PNG is reduced to 256 colours
so that it stays small enough to live in the repository.
"""
from __future__ import annotations

import argparse
import os
import shutil

from PIL import Image
from playwright.sync_api import sync_playwright


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("image")
    parser.add_argument("out")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--width", type=int, default=1180)
    parser.add_argument("--hover", type=int, default=0, metavar="RANK", help="hover this hit (0 = none)")
    args = parser.parse_args()
    chromium = os.environ.get("RETRIEVAL_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("no Chromium found: apt-get install chromium, or set RETRIEVAL_CHROMIUM")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": args.width, "height": 700})
        page.goto(args.url)
        page.fill("#k", str(args.k))
        page.set_input_files("#file", args.image)
        page.wait_for_selector('#result[data-state="done"]', timeout=120_000)
        page.wait_for_function("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
        if args.hover:
            page.hover(f'figure.hit[data-rank="{args.hover}"]')
        page.screenshot(path=args.out, full_page=True)
        browser.close()
    Image.open(args.out).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)
    print(f"wrote {args.out} ({os.path.getsize(args.out) // 1024} KB)")


if __name__ == "__main__":
    main()
