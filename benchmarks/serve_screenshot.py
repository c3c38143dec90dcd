"""The upload page's screenshot in docs/: `visiontune serve RUN` driven in headless Chromium.

    python benchmarks/serve_screenshot.py RUN IMAGE... [--out docs/serve-page.png]

Starts the real server on a free loopback port, picks the images in the page's file input (as a
user does), waits for every result card, saves a screenshot and stops the server. Needs Debian's
chromium and chromium-driver and `pip install selenium` (in [dev]).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--out", default=str(ROOT / "docs" / "serve-page.png"))
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "visiontune.cli.main", "serve", args.run, "--port", str(port)],
                              cwd=ROOT)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--window-size=1200,1000",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"):
        options.add_argument(flag)
    driver = None
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
        driver.get(url)
        driver.find_element(By.ID, "files").send_keys("\n".join(str(Path(p).resolve()) for p in args.images))
        WebDriverWait(driver, 120).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, ".result img.overlay")) == len(args.images))
        time.sleep(0.5)
        driver.save_screenshot(args.out)
        print(f"written: {args.out}")
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
