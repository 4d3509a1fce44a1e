"""In a real browser: JupyterLab runs 04_evaluate.ipynb, shows figures as images and the explorer reacts.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them), selenium and
jupyterlab (the ``test`` extra); skips, saying which is missing, where they are not installed.
Set ``LAGEO_SCREENSHOTS=docs/images`` to refresh the README's screenshot.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from conftest import PROJECT_ROOT

pytestmark = pytest.mark.slow
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver")
MISSING = [name for name, found in (("chromium", CHROMIUM), ("chromedriver (Debian: chromium-driver)", CHROMEDRIVER),
                                    ("selenium", importlib.util.find_spec("selenium")),
                                    ("jupyterlab", importlib.util.find_spec("jupyterlab"))) if not found]
if MISSING:
    pytest.skip(f"real-browser test needs {', '.join(MISSING)} (apt-get install chromium chromium-driver; "
                "pip install -e '.[test]')", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from lageo_utils.notebook import KERNEL_NAME  # noqa: E402

NOTEBOOK = "04_evaluate.ipynb"
EXPLORER_IMG = ".widget-output img"  # the ipywidgets Output of the explorer
NEWS_PROMPT = "official Jupyter news"


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> Path:
    """A run with steps 01-03 done (tiny demo), so 04 has its inputs; made in-process, without papermill."""
    from lageo_utils import steps
    from lageo_utils.runs import mark_latest

    outputs = tmp_path_factory.mktemp("outputs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LAGEO_OUTPUTS", str(outputs))
        run, params = steps.open_step("01_explore_data", None, profile="demo", demo_points_per_region=3,
                                      demo_image_size=96, epochs=1, n_boot=50)
        steps.prepare_data(run, params)
        steps.zero_shot(*steps.open_step("02_zero_shot", run))
        steps.finetune(*steps.open_step("03_finetune", run))
        mark_latest(run)
    return outputs


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def lab(outputs, tmp_path_factory):
    """JupyterLab on 127.0.0.1 with a token, the project's kernelspec and settings, over a copy of the notebook."""
    home = tmp_path_factory.mktemp("jupyter")
    root = home / "notebooks"
    root.mkdir()
    shutil.copy(PROJECT_ROOT / "notebooks" / NOTEBOOK, root / NOTEBOOK)  # the browser saves into the copy
    subprocess.run([sys.executable, "-m", "ipykernel", "install", "--prefix", str(home / "prefix"),
                    "--name", KERNEL_NAME, "--display-name", "lageo (.venv)"],
                   check=True, capture_output=True, timeout=120)
    env = {key: value for key, value in os.environ.items() if key != "MPLBACKEND"}  # the kernel's own backend
    env.update(LAGEO_OUTPUTS=str(outputs), JUPYTER_PATH=str(home / "prefix" / "share" / "jupyter"),
               JUPYTER_CONFIG_PATH=str(PROJECT_ROOT / "jupyter-config"), JUPYTER_CONFIG_DIR=str(home / "config"),
               JUPYTER_DATA_DIR=str(home / "data"), JUPYTER_RUNTIME_DIR=str(home / "runtime"),
               JUPYTERLAB_SETTINGS_DIR=str(home / "settings"), JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"))
    port, token = _free_port(), secrets.token_hex(16)
    url = f"http://127.0.0.1:{port}"
    log = (home / "lab.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
         "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
         *(["--allow-root"] if os.geteuid() == 0 else [])],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_server(url, token, server, home / "lab.log")
        yield {"url": url, "token": token, "root": root, "log": home / "lab.log"}
    finally:
        _stop_server(server, url, token)
        log.close()


def _wait_for_server(url: str, token: str, server: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"JupyterLab exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/api/status", params={"token": token}, timeout=5).ok:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    pytest.fail(f"JupyterLab did not answer on {url} within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _stop_server(server: subprocess.Popen, url: str, token: str) -> None:
    """Shut down the server we started (it stops its kernels), then make sure its process group is gone."""
    if server.poll() is not None:
        return
    try:
        requests.post(f"{url}/api/shutdown", params={"token": token}, timeout=10)
        server.wait(timeout=30)
    except (requests.RequestException, subprocess.TimeoutExpired):
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()  # also stops the chromedriver it started


def _menu(driver, menu: str, item: str) -> None:
    driver.find_element(By.XPATH, f"//div[contains(@class, 'lm-MenuBar-itemLabel') and text()='{menu}']").click()
    WebDriverWait(driver, 10).until(lambda d: d.find_element(
        By.XPATH, f"//div[contains(@class, 'lm-Menu-itemLabel') and text()='{item}']")).click()


def _kernel_idle(driver) -> bool:
    busy_prompts = [p for p in driver.find_elements(By.CSS_SELECTOR, ".jp-InputArea-prompt") if "*" in p.text]
    indicator = driver.find_elements(By.CSS_SELECTOR, ".jp-Notebook-ExecutionIndicator")
    return not busy_prompts and bool(indicator) and indicator[0].get_attribute("data-status") == "idle"


def _select(driver, label: str) -> Select:
    """The explorer's dropdown with this label."""
    dropdown = next(d for d in driver.find_elements(By.CSS_SELECTOR, ".jp-Notebook .widget-dropdown")
                    if d.find_element(By.TAG_NAME, "label").text == label)
    return Select(dropdown.find_element(By.TAG_NAME, "select"))


def _explorer_src(driver) -> str | None:
    images = driver.find_elements(By.CSS_SELECTOR, EXPLORER_IMG)
    return images[0].get_attribute("src") if images else None


def test_jupyterlab_runs_04_with_images_and_a_live_explorer(lab, browser, tmp_path):
    screenshot = tmp_path / "jupyterlab-explorer.png"

    def check(condition, message: str, timeout: float = 1) -> None:
        """Wait until ``condition(browser)`` holds; else fail with a screenshot."""
        try:
            WebDriverWait(browser, timeout, poll_frequency=0.5).until(condition)
        except TimeoutException:
            browser.save_screenshot(str(screenshot))
            screenshot.with_suffix(".html").write_text(browser.page_source)
            pytest.fail(f"{message} (screenshot: {screenshot}, page: {screenshot.with_suffix('.html')}, "
                        f"server log: {lab['log']})")

    browser.get(f"{lab['url']}/lab/tree/{NOTEBOOK}?token={lab['token']}")
    check(lambda d: d.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-Cell"), "the notebook did not open", 120)
    check(lambda d: any(e.text == "lageo (.venv)" for e in d.find_elements(By.CSS_SELECTOR, ".jp-KernelName"))
          and _kernel_idle(d), "the notebook did not start on the lageo kernel without asking", 120)
    _menu(browser, "Run", "Run All Cells")
    check(lambda d: _explorer_src(d) and _kernel_idle(d), "the explorer shows no <img> after Run All", 300)

    body = browser.find_element(By.TAG_NAME, "body").text
    check(lambda d: "<Figure size" not in body, "a figure came out as text")
    check(lambda d: NEWS_PROMPT not in body, "JupyterLab asked about news")
    check(lambda d: not d.find_elements(By.CSS_SELECTOR, ".jp-Dialog"), "a dialog is open (kernel choice?)")
    figures = browser.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-RenderedImage img")
    check(lambda d: len(figures) >= 8, f"{len(figures)} images in the notebook, expected the 7 figures + explorer")

    for control in ("Region", "Model"):
        before = _explorer_src(browser)
        _select(browser, control).select_by_index(1)
        check(lambda d, before=before: _explorer_src(d) not in (None, before),
              f"the explorer's image did not change with the {control}", 60)
        check(_kernel_idle, f"the kernel did not go idle after the {control} change", 60)
    before = _explorer_src(browser)
    _select(browser, "Model").select_by_index(0)  # back to zero-shot for the README's picture
    check(lambda d: _explorer_src(d) not in (None, before) and _kernel_idle(d), "no picture after switching back", 60)

    explorer = browser.find_element(By.CSS_SELECTOR, ".jp-Notebook .widget-vbox")  # controls and picture
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", explorer)
    time.sleep(1)  # let the scroll settle before the picture is taken
    browser.save_screenshot(str(screenshot))
    if os.environ.get("LAGEO_SCREENSHOTS"):
        target = Path(os.environ["LAGEO_SCREENSHOTS"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, target / screenshot.name)
