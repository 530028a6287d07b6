"""Headless Chromium for the dashboard tests and the screenshot script.

Only Debian's ``chromium`` and ``chromium-driver`` packages are used. Where they are
missing and we are root with apt-get (a fresh CI machine), ``ensure_chromium`` installs
them once. Selenium is pointed at ``/usr/bin/chromedriver`` explicitly and runs offline,
so selenium-manager never downloads a browser or a driver.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.apt_util import apt_get

CHROMIUM = os.environ.get("HARPSYNC_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("HARPSYNC_CHROMEDRIVER", "/usr/bin/chromedriver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage")
APT_PACKAGES = ("chromium", "chromium-driver")

_checked: dict[str, str | None] = {}


def _present() -> bool:
    return os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)


def ensure_chromium() -> str | None:
    """Make Chromium and its driver available; None when they are, else why not.

    Installs the Debian packages (and nothing from anywhere else) when they are missing,
    we are root, and apt-get exists. Done once per process.
    """
    if "reason" in _checked:
        return _checked["reason"]
    reason: str | None = None
    try:
        import selenium  # noqa: F401
    except ImportError:
        reason = "selenium is not installed (pip install -e '.[test]')"
    if reason is None and not _present():
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            reason = (f"{CHROMIUM} or {CHROMEDRIVER} is missing, and installing the Debian "
                      f"packages {' '.join(APT_PACKAGES)} needs root and apt-get")
        else:
            steps = (["update"], ["install", "-y", "--no-install-recommends", *APT_PACKAGES])
            for step in steps:
                if _present():  # another test worker installed them meanwhile
                    break
                done = apt_get(*step, timeout=900)
                if done.returncode != 0:
                    reason = (f"'{' '.join(step)}' failed ({done.returncode}): "
                              f"{(done.stderr or done.stdout)[-500:]}")
                    break
            if reason is None and not _present():
                reason = f"the packages installed, but {CHROMIUM} or {CHROMEDRIVER} is missing"
    _checked["reason"] = reason
    return reason


@contextmanager
def chromium(width: int = 1400, height: int = 1000) -> Iterator[Any]:
    """A headless Chromium WebDriver with a fresh profile, quit (and removed) afterwards."""
    os.environ["SE_OFFLINE"] = "true"  # selenium-manager must never fetch anything
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = Path(tempfile.mkdtemp(prefix="harpsync-chromium-"))
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={width},{height}")
    service = Service(executable_path=CHROMEDRIVER, log_output=subprocess.DEVNULL)
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def sign_in(driver: Any, base_url: str, username: str, password: str) -> None:
    """Open ``/dashboard`` and submit the sign-in form."""
    from selenium.webdriver.common.by import By

    driver.get(base_url.rstrip("/") + "/dashboard")
    driver.find_element(By.ID, "username").send_keys(username)
    driver.find_element(By.ID, "password").send_keys(password)
    driver.find_element(By.ID, "login-button").click()


def link_states(driver: Any) -> dict[tuple[str, str], str]:
    """``{(from, to): state}`` of every link line drawn on the mesh."""
    found = driver.execute_script(
        "return [...document.querySelectorAll('#mesh line.link')]"
        ".map(l => [l.dataset.from, l.dataset.to, l.dataset.state]);")
    return {(a, b): s for a, b, s in found}


def node_states(driver: Any) -> dict[str, str]:
    """``{name: "up" | "down"}`` of every node shape drawn on the mesh."""
    found = driver.execute_script(
        "return [...document.querySelectorAll('#mesh g.node')]"
        ".map(g => [g.dataset.node, g.dataset.state]);")
    return {name: state for name, state in found}
