"""The Prefect UI in a real browser: Debian's chromium, driven by Playwright, opens the `tiny`
deployment of the real prefect.yaml (made faster), Quick-runs it, and a process worker runs it to
completion. The screenshots are kept under test-artifacts/ui/ at the repository root."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.prefect_helpers import api, tiny_deployment, wait_for_run, worker  # noqa: F401 (fixtures)

CHROMIUM = os.environ.get("PROLONG_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts" / "ui"
RUN_TIMEOUT = 600  # seconds for the quick run to finish


# ---------------------------------------------------------------- helpers


def missing_browser() -> str | None:
    missing = []
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        missing.append(f"chromium at {CHROMIUM} (apt-get install chromium, or set PROLONG_CHROMIUM)")
    if importlib.util.find_spec("playwright") is None:
        missing.append("the playwright package (infra/requirements.txt)")
    return "UI test needs " + " and ".join(missing) if missing else None


# Chromium and Playwright are required in CI (the test fails there without them); elsewhere their
# absence skips the test before any server starts.
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(missing_browser() is not None and os.environ.get("CI") != "true",
                                 reason=missing_browser() or "")]


def need_browser():
    if msg := missing_browser():
        pytest.fail(msg)


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def ui(prefect_server) -> dict:
    """The server's UI: served at its root, and its browser code pointed at this server's API."""
    api_url = prefect_server["url"]
    root = api_url.removesuffix("/api")
    settings = api(root, "/ui-settings")
    assert settings["api_url"] == api_url, (
        f"the UI would call {settings['api_url']}, not this server: the prefect_server fixture must set "
        f"PREFECT_SERVER_UI_API_URL=http://127.0.0.1:<port>/api")
    req = urllib.request.Request(f"{root}/", headers={"Accept": "text/html"})
    with urllib.request.urlopen(req, timeout=30) as r:  # follows the redirect to the default UI
        assert r.status == 200 and "<html" in r.read().decode(errors="replace").lower()
    # the UI a user lands on from the root URL (v2 in Prefect 3.8); routes differ between the two
    version = settings["default_ui"]
    base = (settings.get(f"{version}_base_url") or "/").rstrip("/")
    flow_run_path = "/runs/flow-run/" if version == "v2" else "/flow-runs/flow-run/"
    return {"root": root, "api": api_url, "version": version, "base": f"{root}{base}",
            "flow_run_path": flow_run_path}


@pytest.fixture
def page(request):
    need_browser()
    from playwright.sync_api import sync_playwright

    # chromium puts its singleton socket in TMPDIR; the per-test one is too long for a socket path
    short_tmp = tempfile.mkdtemp(prefix="pw-", dir="/tmp")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     env={**os.environ, "TMPDIR": short_tmp})
        context = browser.new_context(viewport={"width": 1440, "height": 1000})
        # no network beyond this machine: the UI's analytics calls fail fast instead of hanging
        context.route(lambda url: not url.startswith("http://127.0.0.1"), lambda route: route.abort())
        try:
            yield context.new_page()
        finally:
            context.close()
            browser.close()
            shutil.rmtree(short_tmp, ignore_errors=True)


# ---------------------------------------------------------------- the test


def test_quick_run_of_tiny_from_the_ui_completes(ui, tiny_deployment, worker, page, prefect_env):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for stale in ARTIFACTS.glob("tiny-quick-run-*.png"):
        stale.unlink()
    api_url, dep_id = ui["api"], tiny_deployment["id"]
    before = {r["id"] for r in api(api_url, "/flow_runs/filter", {"deployments": {"id": {"any_": [dep_id]}}})}
    run: dict | None = None
    t0 = time.monotonic()
    try:
        page.goto(f"{ui['base']}/deployments/deployment/{dep_id}")
        page.get_by_text("tiny", exact=True).first.wait_for(timeout=60_000)
        page.get_by_role("button", name="Run", exact=True).click()
        # v2 shows a menu (menuitem), v1 a popover of buttons
        quick = page.get_by_role("menuitem", name="Quick run").or_(page.get_by_role("button", name="Quick run"))
        quick.first.click()

        deadline = time.monotonic() + 30
        while run is None:
            runs = api(api_url, "/flow_runs/filter", {"deployments": {"id": {"any_": [dep_id]}}})
            new = [r for r in runs if r["id"] not in before]
            if new:
                run = new[0]
                break
            assert time.monotonic() < deadline, "clicking Quick run created no flow run"
            time.sleep(0.5)
        assert len(new) == 1, f"one click, {len(new)} flow runs"
        assert run["parameters"]["run_name"] == tiny_deployment["run_name"]

        run = wait_for_run(api_url, run["id"], ("COMPLETED",), worker, timeout=RUN_TIMEOUT)
        elapsed = time.monotonic() - t0

        # the run's work is in the store
        run_dir = tiny_deployment["store"] / tiny_deployment["run_name"]
        for stage in tiny_deployment["stages"]:
            assert (run_dir / stage / "manifest.json").is_file(), sorted(p.name for p in run_dir.glob("*"))
        assert not (run_dir / "stage2").exists()
        tasks = api(api_url, "/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}})
        assert sorted(t["name"] for t in tasks) == sorted(tiny_deployment["stages"])
        assert all(t["state_type"] == "COMPLETED" for t in tasks)

        # and the UI shows the completed run
        page.goto(f"{ui['base']}{ui['flow_run_path']}{run['id']}")
        page.get_by_text(run["name"]).first.wait_for(timeout=60_000)
        page.get_by_text("Completed", exact=True).first.wait_for(timeout=60_000)
        page.wait_for_timeout(1500)  # let the graph and logs render
        shot = ARTIFACTS / "tiny-quick-run-completed.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        print(f"quick run {run['name']} completed in {elapsed:.0f}s; screenshot {shot}")
    except BaseException:
        try:
            if run is not None:
                page.goto(f"{ui['base']}{ui['flow_run_path']}{run['id']}")
                page.wait_for_timeout(3000)
            page.screenshot(path=str(ARTIFACTS / "tiny-quick-run-failure.png"), full_page=True)
        except Exception:
            pass
        raise
