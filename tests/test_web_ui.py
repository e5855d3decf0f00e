"""The web interface as a person sees it: `adit serve`, the Prefect UI, headless Chromium.

One `adit serve` process (its own Prefect server, SQLite under a temporary PREFECT_HOME) for
the module; Playwright drives Debian's Chromium (no browser download). The study picker is
checked in both Prefect UIs: the default one at / (V1: "Resume" button top right) and the
new one at /v2/ (V2: "Resume" in the run's ⋮ menu).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml

from adit_tasks.lab.servers import free_port, port_open

sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
DEPLOYMENTS = {"selective-transfer": "pick-studies", "transfer": "transfer", "query": "query",
               "batch-query": "batch-query", "batch-transfer": "batch-transfer",
               "continuous-transfer": "continuous"}
UIS = ["v1", "v2"]
# Which study each UI's run ticks (index into the patient's studies): a different one each.
PICK = {"v1": 0, "v2": 1}

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium")


@dataclass
class Served:
    url: str
    api_url: str
    downloads: Path


@dataclass
class Picker:
    studies: list[Any]  # the patient's StudySpecs
    runs: dict[str, str]  # UI -> id of a paused pick-studies run


def _post(url: str, body: dict) -> Any:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as rsp:
        return json.loads(rsp.read())


def _ready(api_url: str) -> bool:
    """The API answers and every deployment of `adit serve` exists."""
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as rsp:
            if rsp.status != 200:
                return False
        flows = {f["id"]: f["name"] for f in _post(f"{api_url}/flows/filter", {})}
        have = {f"{flows.get(d['flow_id'])}/{d['name']}"
                for d in _post(f"{api_url}/deployments/filter", {})}
    except OSError:
        return False
    return {f"{f}/{d}" for f, d in DEPLOYMENTS.items()} <= have


def _client(served: Served) -> Any:
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(served.api_url)


@pytest.fixture(scope="module")
def served(lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """`adit serve` in its own session, with its own PREFECT_HOME and downloads folder."""
    root = tmp_path_factory.mktemp("web-ui")
    config = yaml.safe_load(lab.nodes_file.read_text())
    for node in config["nodes"]:
        if node["name"] == "downloads":
            node["path"] = str(root / "downloads")
    nodes_file = root / "nodes.yaml"
    nodes_file.write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(root / "prefect-home"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    env.pop("PREFECT_API_URL", None)
    log = root / "serve.log"
    api_url = f"http://127.0.0.1:{port}/api"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "deployments.cli", "serve", "--port", str(port),
             "--nodes-file", str(nodes_file)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not _ready(api_url):
            tail = log.read_text(errors="replace")[-3000:]
            assert proc.poll() is None, f"adit serve exited early:\n{tail}"
            assert time.monotonic() < deadline, f"adit serve not ready in 90 s:\n{tail}"
            time.sleep(0.5)
        yield Served(f"http://127.0.0.1:{port}", api_url, root / "downloads")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # it stops the Prefect server it started
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
    deadline = time.monotonic() + 15
    while port_open("127.0.0.1", port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not port_open("127.0.0.1", port), f"something still listens on port {port}"
    assert proc.returncode == 0, log.read_text(errors="replace")[-3000:]


@pytest.fixture(scope="module")
def picker(lab, served: Served) -> Picker:
    """One pick-studies run per UI, started from the deployment, all paused at the form."""
    patient = next(s.patient_id for s in lab.demo
                   if sum(x.patient_id == s.patient_id for x in lab.demo) >= 3)
    studies = [s for s in lab.demo if s.patient_id == patient]
    assert len({s.instance_count for s in studies}) == len(studies)  # sizes tell them apart
    with _client(served) as client:
        deployment = client.read_deployment_by_name("selective-transfer/pick-studies")
        runs = {ui: client.create_flow_run_from_deployment(
                    deployment.id, parameters={"source": "orthanc1", "destination": "downloads",
                                               "search": {"patient_id": patient}}).id
                for ui in UIS}
        # `adit serve` polls for scheduled runs every ~10 s; the query itself is quick.
        deadline = time.monotonic() + 60
        while True:
            states = {ui: client.read_flow_run(run_id).state for ui, run_id in runs.items()}
            if all(s is not None and s.is_paused() for s in states.values()):
                break
            assert not any(s is not None and s.is_final() for s in states.values()), states
            assert time.monotonic() < deadline, f"the runs never paused: {states}"
            time.sleep(0.5)
    return Picker(studies, {ui: str(run_id) for ui, run_id in runs.items()})


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                      headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(20_000)
    try:
        yield page
    finally:
        context.close()


def open_resume_form(page: Any, served: Served, ui: str, run_id: str) -> Any:
    """Open the run's page and its Resume form, as a person would; returns the form."""
    if ui == "v1":
        page.goto(f"{served.url}/runs/flow-run/{run_id}")
        page.get_by_role("button", name="Resume").click()
        form = page.locator(".p-modal__card")
    else:
        page.goto(f"{served.url}/v2/runs/flow-run/{run_id}")
        # The ⋮ button next to the run's name has no accessible name.
        page.locator("button[aria-haspopup=menu]:has(svg.lucide-ellipsis-vertical)").first.click()
        page.get_by_role("menuitem", name="Resume").click()
        form = page.get_by_role("dialog")
    expect(form.get_by_text("Resume Flow Run")).to_be_visible()
    expect(form.get_by_text("Studies (Optional)")).to_be_visible()
    return form


def open_studies_select(page: Any, form: Any, ui: str) -> Any:
    """Open the Studies multi-select; returns its options."""
    options = page.get_by_role("option")
    if ui == "v2":
        form.get_by_role("button", name="Select Studies").click()
        expect(options.first).to_be_visible()
        return options
    control = form.locator(".schema-form-property", has_text="Studies (Optional)").locator(
        ".p-select-button__control")
    # V1's select does not always open on the first click right after the modal opened;
    # the keyboard (ArrowDown on the focused control) opens it too.
    for attempt in range(3):
        if attempt == 0:
            control.click()
        else:
            control.focus()
            page.keyboard.press("ArrowDown")
        try:
            expect(options.first).to_be_visible(timeout=3_000)
            return options
        except AssertionError:
            continue
    raise AssertionError("the Studies multi-select did not open")


def test_deployments_page_lists_every_deployment(served, page):
    page.goto(f"{served.url}/deployments")
    expect(page.get_by_text(f"{len(DEPLOYMENTS)} Deployments")).to_be_visible()
    for flow_name, name in DEPLOYMENTS.items():
        row = page.locator("tr", has=page.get_by_text(name, exact=True))
        expect(row.first).to_be_visible()
        expect(row.first).to_contain_text(flow_name)
    page.goto(f"{served.url}/v2/deployments")
    for name in DEPLOYMENTS.values():
        expect(page.get_by_role("link", name=name, exact=True).first).to_be_visible()


@pytest.mark.parametrize("ui", UIS)
def test_resume_form_lists_the_studies_found(served, picker, page, ui, tmp_path):
    form = open_resume_form(page, served, ui, picker.runs[ui])
    description = form.locator("article.markdown-renderer").first if ui == "v1" else form
    expect(description).to_contain_text(f"{len(picker.studies)} studies found on orthanc1.")
    for spec in picker.studies:
        expect(description).to_contain_text(spec.study_description)
        expect(description).to_contain_text(spec.accession)
    if ui == "v2":
        # V1 renders the table but its modal squeezes it to zero height at this window size
        # (a flex item with overflow:auto); V2 shows it above the fields.
        for spec in picker.studies:
            expect(form.get_by_role("cell", name=spec.accession, exact=True)).to_be_visible()
    options = open_studies_select(page, form, ui)
    expect(options).to_have_count(len(picker.studies))
    labels = options.all_inner_texts()
    for spec in picker.studies:
        suffix = f"{spec.study_description} ({spec.instance_count} images)"
        assert sum(label.endswith(suffix) for label in labels) == 1, (suffix, labels)
    assert sorted(label.split(".", 1)[0] for label in labels) == [
        str(i) for i in range(1, len(picker.studies) + 1)]
    page.screenshot(path=tmp_path / f"resume-form-{ui}.png")
    assert (tmp_path / f"resume-form-{ui}.png").stat().st_size > 10_000


@pytest.mark.parametrize("ui", UIS)
def test_ticking_one_study_transfers_exactly_that_study(served, picker, page, ui):
    chosen = picker.studies[PICK[ui]]
    before = set(served.downloads.rglob("*.dcm"))
    form = open_resume_form(page, served, ui, picker.runs[ui])
    options = open_studies_select(page, form, ui)
    options.filter(has_text=f"{chosen.study_description} ({chosen.instance_count} images)").click()
    # Close the option list by clicking the form's title, then submit.
    form.get_by_text("Resume Flow Run").click()
    expect(page.get_by_role("option")).to_have_count(0)
    if ui == "v1":
        expect(form.locator(".p-select-button__control").first).to_contain_text(
            f"{chosen.study_description} ({chosen.instance_count} images)")
        form.get_by_role("button", name="Submit").click()
    else:
        # V2 shows each selected study as a tag (with a "Remove <label> tag" button).
        tags = form.get_by_role("button", name=re.compile(r"^Remove .* tag$"))
        expect(tags).to_have_count(1)
        expect(form.get_by_role("button", name=re.compile(
            rf"^Remove .*{re.escape(chosen.study_description)} "
            rf"\({chosen.instance_count} images\) tag$"))).to_have_count(1)
        form.get_by_role("button", name="Resume", exact=True).click()
    expect(form).to_be_hidden()
    with _client(served) as client:
        deadline = time.monotonic() + 60
        while not (state := client.read_flow_run(picker.runs[ui]).state).is_final():
            assert time.monotonic() < deadline, f"the run did not finish: {state}"
            time.sleep(0.5)
    assert state.is_completed(), state
    assert state.message == "1 of 1 studies transferred"
    new = set(served.downloads.rglob("*.dcm")) - before
    uids = {pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID for f in new}
    assert uids == {chosen.study_uid}
    assert len(new) == chosen.instance_count
    page.reload()
    expect(page.get_by_text("Completed").first).to_be_visible()
