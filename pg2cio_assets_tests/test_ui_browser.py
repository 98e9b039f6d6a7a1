"""End to end through the browser: `dagster dev` over the project, driven by headless Chromium
(Debian's package, through Playwright), with screenshots kept as test artefacts."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import httpx
import psycopg
import pytest

from pg2cio_assets.definitions import defs

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (it is in the dev extra: pip install -e '.[dev]')"
)

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("PG2CIO_TEST_ARTIFACTS") or Path(__file__).resolve().parent / "artifacts")
# Unpartitioned, so a click launches it with nothing to choose, and it succeeds on an empty state
# schema (it creates its ledger tables).
ASSET = "delivery_report"


def test_the_ui_shows_every_asset_and_materializes_one_from_a_click(chromium, webserver, dagster_database, capsys):
    expected = _assets_by_group()
    shots: list[Path] = []
    with _browser_page(chromium, shots) as page:
        page.goto(f"{webserver}/asset-groups")
        # The code location may still be loading when the page opens, hence the long first wait.
        _expect_groups_in_graph(page, expected, timeout=120_000)
        rows = _open_every_group_in_the_tree(page, expected)
        # Selecting a group pans the graph to it; a reload fits the whole graph again and keeps
        # the tree open, for a screenshot that shows it all.
        page.reload()
        _expect_groups_in_graph(page, expected)
        sync_api.expect(_tree_rows(page)).to_have_count(rows)
        assert _assets_in_the_tree(page) == expected
        shots.append(_screenshot(page, "ui-asset-graph.png"))

        page.goto(f"{webserver}/assets/{ASSET}")
        page.get_by_role("button").filter(has_text=re.compile(r"^Materialize$")).click()
        # Dagster warns that the upstream assets were never materialized and asks to go on.
        page.get_by_role("button", name="Confirm", exact=True).click()
        toast = page.get_by_role("region", name=re.compile("^Notifications"))
        sync_api.expect(toast.get_by_text(re.compile(r"^Launched run [0-9a-f]{8}$"))).to_be_visible()
        toast.get_by_role("link", name="View", exact=True).click()
        page.wait_for_url(re.compile(r"/runs/[0-9a-f-]{36}"))
        run_id = re.search(r"/runs/([0-9a-f-]{36})", page.url).group(1)

        # The run page follows the run live: queued, starting, started, then an end state.
        status = page.get_by_text(re.compile(r"^(Success|Failure|Canceled)$")).first
        sync_api.expect(status).to_be_visible(timeout=180_000)
        ended = status.inner_text()
        if ended == "Success":
            sync_api.expect(page.get_by_text("RUN_SUCCESS", exact=True)).to_be_visible()
        shots.append(_screenshot(page, f"ui-run-{ended.lower()}.png"))
        assert ended == "Success", f"run {run_id} ended {ended}: see its screenshot and the dagster dev output"

    with psycopg.connect(dagster_database) as conn:
        row = conn.execute("SELECT status FROM runs WHERE run_id = %s", (run_id,)).fetchone()
    assert row == ("SUCCESS",), f"the instance recorded run {run_id} as {row}"
    with capsys.disabled():  # shown even when the test passes: CI collects these files
        print("".join(f"\nscreenshot: {path}" for path in shots))


@contextmanager
def _browser_page(chromium: str, shots: list[Path]):
    """A page in headless Chromium; if the test fails while it is open, a screenshot of it."""
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium, headless=True,
            # Root in a container: Chromium's sandbox needs user namespaces and /dev/shm is often tiny.
            args=["--no-sandbox", "--disable-dev-shm-usage"],
        )
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1400})
            page.set_default_timeout(60_000)
            # A fresh instance invites the first visitor to join the Dagster community, in a
            # dialog over whichever page comes first; dismiss it whenever it is in the way.
            page.add_locator_handler(page.get_by_role("button", name="Skip", exact=True), lambda b: b.click())
            try:
                yield page
            except BaseException:
                print(f"screenshot: {_screenshot(page, 'ui-failure.png')}")
                raise
        finally:
            browser.close()


def _assets_by_group() -> dict[str, list[str]]:
    """Every asset of the code location, by group, named as the graph's tree names them (the last
    part of the key: `commerce/customers` is `customers` under `source`)."""
    graph = defs.resolve_asset_graph()
    groups: dict[str, list[str]] = defaultdict(list)
    for key in graph.get_all_asset_keys():
        groups[graph.get(key).group_name].append(key.path[-1])
    return {group: sorted(names) for group, names in groups.items()}


def _expect_groups_in_graph(page, expected: dict[str, list[str]], timeout: float = 30_000) -> None:
    """The graph opens with every group collapsed to one node, named after it."""
    for group in sorted(expected):
        sync_api.expect(page.locator("svg").get_by_text(group, exact=True)).to_be_visible(timeout=timeout)


def _tree_rows(page):
    # Each row of the graph's tree is a button holding an icon and the full name in `title`.
    return page.locator("button > [title]")


def _open_every_group_in_the_tree(page, expected: dict[str, list[str]]) -> int:
    """Expand every group of the tree beside the graph; returns how many rows it then has."""
    rows = _tree_rows(page)
    for group in sorted(expected):
        label = (page.get_by_role("button")
                 .filter(has=page.get_by_role("img", name="asset_group", exact=True))
                 .filter(has=page.locator(f'[title="{group}"]')))
        label.click()
        before = rows.count()
        page.keyboard.press("ArrowRight")  # the tree's keyboard shortcut to expand the selected group
        sync_api.expect(rows).not_to_have_count(before)
    return rows.count()


def _assets_in_the_tree(page) -> dict[str, list[str]]:
    """The tree read back as {group: [asset, ...]}: rows come in tree order, each group before
    its assets, and a group's row has the asset_group icon."""
    rows = _tree_rows(page).evaluate_all(
        """els => els.map(e => [e.parentElement.querySelector('[aria-label="asset_group"]') !== null,
                              e.getAttribute('title')])"""
    )
    shown: dict[str, list[str]] = {}
    current: list[str] = []
    for is_group, title in rows:
        if is_group:
            current = shown.setdefault(title, [])
        else:
            current.append(title)
    return {group: sorted(names) for group, names in shown.items()}


def _screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path))
    return path


@pytest.fixture
def chromium() -> str:
    """Debian's Chromium (PG2CIO_CHROMIUM, else /usr/bin/chromium, else `chromium` on PATH)."""
    configured = os.environ.get("PG2CIO_CHROMIUM")
    if configured:
        if not os.access(configured, os.X_OK):
            pytest.skip(f"PG2CIO_CHROMIUM={configured} is not an executable")
        return configured
    for candidate in ("/usr/bin/chromium", shutil.which("chromium")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.skip("no Chromium: install Debian's `chromium` package (.ci/run does) or set PG2CIO_CHROMIUM")


@pytest.fixture
def webserver(seeded, dagster_database, tmp_path):
    """`dagster dev` (webserver and daemon) over workspace.yaml, on the instance dagster.yaml
    describes, in dry-run mode so no Customer.io is needed; yields its base URL."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copyfile(ROOT / "dagster.yaml", home / "dagster.yaml")
    env = {k: v for k, v in os.environ.items() if k != "PG2CIO_STATE_URL"}
    env.update(
        DAGSTER_HOME=str(home), PG2CIO_DAGSTER_URL=dagster_database, PG2CIO_DRY_RUN="1",
        PG2CIO_SOURCE_URL=seeded.url, PG2CIO_SOURCE_SCHEMA=seeded.source_schema,
        PG2CIO_STATE_SCHEMA=seeded.state_schema,
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = tmp_path / "dagster-dev.log"
    with open(log_path, "wb") as log:
        # Its own session, so teardown can stop dagster dev and every process it started at once.
        proc = subprocess.Popen(
            [sys.executable, "-m", "dagster", "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(url, proc, log_path)
        yield url
    finally:
        _stop(proc)
        # pytest shows this only when the test fails: the server's side of the story.
        print(f"---- dagster dev output ({log_path}) ----\n{log_path.read_text(errors='replace')[-20_000:]}")


def _wait_for(url: str, proc: subprocess.Popen, log_path: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"dagster dev exited with {proc.returncode}:\n{log_path.read_text(errors='replace')}")
        try:
            if httpx.get(f"{url}/server_info", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"dagster dev did not answer at {url} within {timeout:.0f}s:\n{log_path.read_text(errors='replace')}")


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        pass
    try:
        # dagster dev may be gone while a child it started lingers in the group.
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)
