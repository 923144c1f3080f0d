"""The dashboard in a real browser: Debian's headless Chromium, driven by Playwright, opens
/dashboard on a real herd that routes for fake Ollama nodes, and each tab must show what the
traffic sent through the router says. A screenshot of every tab lands in tests/artifacts/; the
two the README shows go to docs/.

Needs the `playwright` package (test extras) and /usr/bin/chromium (`apt-get install chromium`;
never `playwright install`). Without them the module is skipped."""

import os
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests

import herd
from conftest import CHAT, OPENAI_CHAT, ROOT, heartbeat, wait_for

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extras)")
expect = sync_api.expect

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync"]
VIEWPORT = {"width": 1280, "height": 800}  # the README's screenshots are this size
ARTIFACTS = ROOT / "tests" / "artifacts"
DOCS = ROOT / "docs"
SEEN_MS = 8000  # how long an assertion waits for the page to show something (Overview polls every 2 s)

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium: apt-get install chromium")
expect.set_options(timeout=SEEN_MS)


# -- the browser ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    """One Chromium for the module; each test gets its own context (fresh storage) from it."""
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    """A 1280x800 page that fails the test on any JavaScript exception or console error (but the
    browser's own "Failed to load resource" lines for answers that are errors on purpose)."""
    context = browser.new_context(viewport=VIEWPORT)
    tab = context.new_page()
    tab.set_default_timeout(SEEN_MS)
    problems = []
    tab.on("pageerror", lambda exc: problems.append(f"JavaScript exception: {exc}"))
    tab.on("console", lambda message: problems.append(f"console error: {message.text}")
           if message.type == "error" and not message.text.startswith("Failed to load resource") else None)
    yield tab
    context.close()
    assert not problems, "the page reported errors:\n" + "\n".join(problems)


def open_tab(page, router, tab):
    page.goto(f"{router.url}/dashboard#{tab}")
    expect(page.locator(f"#tab-{tab}")).to_be_visible()


def snap(page, name, full_page=True):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=full_page)


def snap_for_readme(page, name):
    """The README's screenshots, taken again only when asked (HERD_README_SHOTS=1), so that a test
    run leaves the checkout as it was."""
    if os.environ.get("HERD_README_SHOTS"):
        DOCS.mkdir(exist_ok=True)
        page.screenshot(path=str(DOCS / f"{name}.png"))


# -- a fleet with known traffic -------------------------------------------------------------

# what each node's agent reports besides its models (studio and rtx: interval 30 s, online all test long)
STUDIO = dict(hostname="studio.local", interval_s=30, cpu_percent=12.0, num_parallel=4, memory_budget_gb=144,
              memory={"total_gb": 192, "available_gb": 131},
              gpu={"kind": "apple", "unified": True, "vram_total_gb": 192, "vram_used_gb": None})
RTX = dict(hostname="rtx-box", interval_s=30, cpu_percent=4.0, num_parallel=2, memory_budget_gb=23,
           memory={"total_gb": 64, "available_gb": 41},
           gpu={"kind": "nvidia", "vram_total_gb": 24, "vram_used_gb": 6.5,
                "gpus": [{"name": "NVIDIA GeForce RTX 4090", "vram_total_gb": 24, "vram_used_gb": 6.5}]})
MINI = dict(hostname="mac-mini", cpu_percent=30.0, num_parallel=1, memory_budget_gb=12,
            memory={"total_gb": 16, "available_gb": 5.5},
            gpu={"kind": "apple", "unified": True, "vram_total_gb": 16, "vram_used_gb": None})


class Agent:
    """Posts `fake`'s heartbeat every `interval_s`, as herd-node would, until stopped: then the
    router sees the node go offline after three missed intervals."""

    def __init__(self, router, node_id, fake, interval_s=0.25, **fields):
        self.stopped = threading.Event()
        self.beat = lambda: heartbeat(router, node_id, fake, interval_s=interval_s, **fields)
        assert self.beat().status_code == 200
        self.thread = threading.Thread(target=self.run, args=(interval_s,), daemon=True)
        self.thread.start()

    def run(self, interval_s):
        while not self.stopped.wait(interval_s / 2):
            try:
                self.beat()
            except requests.RequestException:
                pass  # the router is gone (a test stopped it); the agent keeps trying, as herd-node does

    def stop(self):
        self.stopped.set()
        self.thread.join()


@pytest.fixture
def start_agent():
    agents = []

    def start(router, node_id, fake, **fields):
        agents.append(Agent(router, node_id, fake, **fields))
        return agents[-1]

    yield start
    for agent in agents:
        agent.stop()


def ns_per_reply(fake, tokens_per_s):
    """What the fake's replies say generation took, so herd learns a believable speed."""
    return int(fake.tokens / tokens_per_s * 1e9)


def send(router, path, body, **headers):
    answer = requests.post(router.url + path, json=body, headers=headers, timeout=30)
    answer.content  # a stream is read to its end
    return answer


@pytest.fixture
def fleet(make_fake, make_router, start_agent):
    """Three nodes, each reporting as herd-node would; `mini`'s agent stops halfway, so it goes
    offline. Traffic, 13 requests: 3 streamed chats tagged notebook (X-Herd-Tags; the last fails
    on studio with a 500 and is retried on rtx), 5 chats tagged webui (metadata.tags; one streamed
    after mini went offline), 2 OpenAI streams from user alice, and 3 untagged: an embedding, a
    chat served by its fallback model, and one for a model no node has (404)."""
    studio = make_fake(models={"llama3.2": 2.0, "qwen2.5:7b": 4.7, "llama3.1:70b": 40.0, "nomic-embed-text": 0.3},
                       loaded=["qwen2.5:7b", "llama3.2"], context_length=8192, token_delay=0.01)
    rtx = make_fake(models={"llama3.2": 2.0, "qwen2.5:7b": 4.7}, loaded=["llama3.2"], token_delay=0.005)
    mini = make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"], token_delay=0.02)
    # studio is the fastest and the only node with qwen2.5:7b loaded: every qwen request goes there
    # first, so the failure planted on it below is met by the retried request, not by chance
    for fake, speed in ((studio, 120), (rtx, 90), (mini, 20)):
        fake.eval_duration_ns = ns_per_reply(fake, speed)
    router = make_router()
    router.herd.change_settings({"auto_pull": False, "preload": False})  # no side traffic to the fakes
    assert heartbeat(router, "studio", studio, **STUDIO).status_code == 200
    assert heartbeat(router, "rtx", rtx, **RTX).status_code == 200
    mini_agent = start_agent(router, "mini", mini, **MINI)
    router.wait_online(3)

    for _ in range(2):  # first, while no node is measured: studio (hot, no load) serves them both
        answer = send(router, "/api/chat", dict(CHAT, model="qwen2.5:7b", stream=True), **{"X-Herd-Tags": "notebook"})
        assert answer.status_code == 200 and answer.headers["X-Herd-Node"] == "studio"
    webui = dict(CHAT, metadata={"tags": ["webui"]})
    for _ in range(4):
        assert send(router, "/api/chat", webui).status_code == 200
    for _ in range(2):
        assert send(router, "/v1/chat/completions", dict(OPENAI_CHAT, user="alice", stream=True)).status_code == 200
    assert send(router, "/api/embed", {"model": "nomic-embed-text", "input": "hello"}).status_code == 200
    fallback = send(router, "/api/chat", dict(CHAT, model="llama3.1:405b", fallback_models=["llama3.2"]))
    assert fallback.status_code == 200 and fallback.headers["X-Herd-Model"] == "llama3.2:latest"
    assert send(router, "/api/chat", dict(CHAT, model="mistral")).status_code == 404

    mini_agent.stop()
    wait_for(lambda: node_status(router, "mini") == "offline", what="mini offline")
    assert send(router, "/api/chat", dict(webui, stream=True)).status_code == 200
    studio.fail_next(1, status=500)
    retried = send(router, "/api/chat", dict(CHAT, model="qwen2.5:7b", stream=True), **{"X-Herd-Tags": "notebook"})
    assert retried.status_code == 200 and retried.headers["X-Herd-Node"] == "rtx"

    router.written()
    traces = requests.get(router.url + "/dashboard/api/traces", params={"limit": 50}, timeout=10).json()["traces"]
    assert len(traces) == 13
    assert [t["retry_count"] for t in traces[:2]] == [1, 0]  # newest first: the retry, the stream before it
    return SimpleNamespace(router=router, traces=traces, retried=traces[0], after_offline=traces[1])


def node_status(router, node_id):
    return next(n["status"] for n in router.status()["nodes"] if n["node_id"] == node_id)


def node_card(page, node_id):
    return page.locator(f'#node-cards .node-card[data-node="{node_id}"]')


def cell_texts(row):
    return [text.strip() for text in row.locator("td").all_inner_texts()]


# -- one test per tab ----------------------------------------------------------------------

def test_overview_shows_each_node_its_status_and_loaded_models(page, fleet):
    open_tab(page, fleet.router, "overview")
    for node_id, status in (("studio", "Online"), ("rtx", "Online"), ("mini", "Offline")):
        expect(node_card(page, node_id).locator(".node-name")).to_have_text(node_id)
        expect(node_card(page, node_id).locator(".status-badge")).to_have_text(status)
    expect(page.locator('#fleet-totals [data-key="nodes_online"] .total-value')).to_have_text("2 / 3")
    studio = node_card(page, "studio")
    for model in ("qwen2.5:7b", "llama3.2:latest"):
        expect(studio.locator(f'tr.loaded-model[data-model="{model}"] .model-name')).to_have_text(model)
    expect(studio).to_contain_text("Apple")
    expect(node_card(page, "rtx")).to_contain_text("NVIDIA GeForce RTX 4090")
    expect(node_card(page, "rtx").locator('tr.loaded-model[data-model="qwen2.5:7b"]')).to_be_visible()
    expect(page.locator("#status-line")).to_contain_text("2 of 3 nodes online")
    snap(page, "overview")
    snap_for_readme(page, "overview")


def test_trends_draws_the_traffic_in_charts(page, fleet):
    open_tab(page, fleet.router, "trends")
    expect(page.locator('#trends-totals [data-key="requests"] .total-value')).to_have_text("13")
    expect(page.locator('#trends-totals [data-key="errors"] .total-value')).to_have_text("1")
    for chart in ("requests", "latency", "tokens"):
        expect(page.locator(f"#chart-{chart} svg.chart-svg")).to_be_visible()
    bars = page.locator('#chart-requests svg rect[fill="#3b82f6"]')  # the requests series
    assert bars.count() >= 1
    assert float(bars.first.get_attribute("height")) > 10
    assert page.locator("#chart-latency svg path.series, #chart-latency svg circle").count() >= 1
    assert page.locator("#chart-tokens svg rect[fill]").count() >= 2  # tokens in and out, stacked
    snap(page, "trends")


def test_model_insights_lists_every_model_served(page, fleet):
    open_tab(page, fleet.router, "models")
    rows = page.locator("#models-table tr.model-row")
    expect(rows).to_have_count(4)
    expected = {"llama3.2:latest": "8", "qwen2.5:7b": "3", "nomic-embed-text:latest": "1", "mistral:latest": "1"}
    for model, requests_n in expected.items():
        row = page.locator(f'#models-table tr.model-row[data-model="{model}"]')
        expect(row).to_be_visible()
        assert cell_texts(row)[1] == requests_n, (model, cell_texts(row))
    assert cell_texts(page.locator('tr.model-row[data-model="mistral:latest"]'))[2].startswith("1")  # its error
    llama = page.locator('tr.model-row[data-model="llama3.2:latest"]')
    served_by = sorted({t["node_id"] for t in fleet.traces if t["model"] == "llama3.2:latest"})
    expect(llama.locator(".chip")).to_have_text(served_by)
    llama.locator("button.expand").click()
    expect(page.locator('tr.model-nodes[data-model="llama3.2:latest"] .model-tps-chart svg')).to_be_visible()
    snap(page, "models")


def test_apps_lists_each_tag_and_untagged_clients(page, fleet):
    open_tab(page, fleet.router, "apps")
    for app, requests_n in (("webui", "5"), ("notebook", "3"), ("user:alice", "2")):
        row = page.locator(f'#apps-table tr[data-app="{app}"]')
        expect(row).to_be_visible()
        assert cell_texts(row)[1] == requests_n, (app, cell_texts(row))
    client = page.locator('#apps-table tr[data-app$=" from 127.0.0.1"]')
    expect(client).to_have_count(1)
    assert cell_texts(client)[1] == "3"
    expect(page.locator('#apps-totals [data-key="requests"] .total-value')).to_have_text("13")
    expect(page.locator("#chart-apps svg .bar-row")).to_have_count(4)
    snap(page, "apps")


def test_benchmarks_shows_speeds_from_traffic_and_runs_one(page, fleet):
    open_tab(page, fleet.router, "benchmarks")
    served = sorted({(t["node_id"], t["model"]) for t in fleet.traces if t["node_id"]})  # routing decides
    expect(page.locator("#bench-traffic tbody tr")).to_have_count(len(served))
    shown = page.locator("#bench-traffic tbody tr").evaluate_all("rows => rows.map(r => [r.dataset.node, "
                                                                "r.dataset.model])")
    assert sorted(map(tuple, shown)) == served
    assert ("studio", "nomic-embed-text:latest") in served  # the only node with it
    expect(page.locator("#benchmarks-body")).to_contain_text("No benchmark has been run yet")
    page.select_option("#bench-node", "rtx")
    page.select_option("#bench-model", "llama3.2:latest")
    page.click("#bench-run")
    expect(page.locator("#bench-result")).to_contain_text("Done in", timeout=30000)
    expect(page.locator("#bench-result")).to_contain_text("2 streams")
    expect(page.locator("#bench-runs tbody tr")).to_have_count(1)
    expect(page.locator("#bench-runs tbody tr")).to_contain_text("rtx")
    runs = requests.get(fleet.router.url + "/dashboard/api/benchmarks", timeout=10).json()["runs"]
    assert [(r["node_id"], r["model"], r["error"]) for r in runs] == [("rtx", "llama3.2:latest", None)]
    snap(page, "benchmarks")


def test_health_shows_the_offline_node_as_a_finding(page, fleet):
    open_tab(page, fleet.router, "health")
    offline = page.locator('#health-findings .finding[data-id="node_offline"]')
    expect(offline).to_have_count(1)
    expect(offline.locator(".finding-title")).to_have_text("mini is offline")
    expect(offline).to_have_attribute("data-severity", "critical")
    expect(offline.locator(".fix")).to_contain_text("herd-node")
    score = int(page.locator("#health-score").inner_text())
    assert 0 <= score < 100
    expect(page.locator('#health-vitals [data-key="requests"] .total-value')).to_have_text("13")
    snap(page, "health")


def test_recommendations_show_models_unused_on_disk(page, fleet):
    open_tab(page, fleet.router, "recommendations")
    unused = page.locator('#recs-list .rec[data-kind="unused_on_disk"]', has_text="llama3.1:70b")
    expect(unused).to_have_count(1)
    expect(unused).to_contain_text("studio")
    expect(unused.locator(".kind-badge")).to_have_text("Unused on disk")
    snap(page, "recommendations")


def test_settings_change_the_routers_settings(page, fleet):
    router = fleet.router
    open_tab(page, router, "settings")
    auto_pull = page.locator("#setting-auto_pull")
    expect(auto_pull).to_be_enabled()
    expect(auto_pull).not_to_be_checked()
    expect(page.locator("#setting-vram_fallback")).to_be_checked()
    auto_pull.check()
    expect(page.locator("#settings-saved")).to_have_text("Saved")
    assert router.herd.settings["auto_pull"] is True
    page.select_option("#setting-context_protection", "warn")
    wait_for(lambda: router.herd.settings["context_protection"] == "warn", what="context_protection warn")
    stored = requests.get(router.url + "/dashboard/api/settings", timeout=10).json()
    assert stored["auto_pull"] is True and stored["context_protection"] == "warn"
    studio = page.locator('#mm-body .mm-node[data-node="studio"]')
    expect(studio.locator('tr[data-model="llama3.1:70b"]')).to_contain_text("on disk")
    expect(studio.locator('tr[data-model="qwen2.5:7b"]')).to_contain_text("loaded")
    snap(page, "settings")


def test_request_log_row_opens_its_routing_decision(page, fleet):
    open_tab(page, fleet.router, "requests")
    rows = page.locator("#requests-table tr.req-row")
    expect(rows).to_have_count(13)
    retried = fleet.retried
    row = page.locator(f'#requests-table tr.req-row[data-id="{retried["request_id"]}"]')
    expect(row).to_contain_text("retry ×1")
    row.click()
    panel = page.locator("#decision-panel")
    expect(panel).to_be_visible()
    expect(page.locator("#decision-events")).to_contain_text("studio failed")
    chosen = page.locator("#decision-candidates li.candidate.chosen")
    expect(chosen).to_have_count(1)
    expect(chosen).to_have_attribute("data-node", "rtx")
    expect(page.locator("#decision-excluded")).to_contain_text("mini")
    expect(page.locator("details.attempt summary")).to_contain_text("chose studio")
    expect(page.locator("#decision-signals tr[data-signal]")).to_have_count(7)
    snap(page, "decision-retry", full_page=False)

    # a request routed after mini went offline: two candidates, mini excluded
    page.locator("#decision-close").click()
    expect(panel).to_be_hidden()
    routed = fleet.after_offline
    page.locator(f'#requests-table tr.req-row[data-id="{routed["request_id"]}"]').click()
    candidates = page.locator("#decision-candidates li.candidate")
    expect(candidates).to_have_count(2)
    assert sorted(candidates.evaluate_all("items => items.map(i => i.dataset.node)")) == ["rtx", "studio"]
    expect(page.locator("#decision-candidates li.candidate.chosen")).to_have_attribute("data-node", routed["node_id"])
    expect(page.locator("#decision-excluded")).to_contain_text("mini: offline")
    snap(page, "requests")
    page.locator("#decision").evaluate(  # the drawer scrolled to the decision, for the README
        "body => { body.scrollTop += body.querySelector('h3').getBoundingClientRect().top"
        " - body.getBoundingClientRect().top - 2 }")
    assert "-0" not in page.locator("#decision-signals .sig-v").all_inner_texts()  # the router sends -0.0
    snap(page, "decision", full_page=False)
    snap_for_readme(page, "decision")


# -- the key, live refresh, and a router that went away ----------------------------------------

def test_api_key_is_asked_once_and_every_tab_then_loads(page, make_fake, make_router):
    fake = make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"])
    router = make_router(nodes=[("solo", fake.url)], api_key="k")
    assert requests.post(router.url + "/api/chat", json=dict(CHAT, metadata={"tags": ["keyed"]}),
                         headers={"Authorization": "Bearer k"}, timeout=30).status_code == 200
    router.written()
    page.add_init_script("""window.keyAsked = 0;
        const showModal = HTMLDialogElement.prototype.showModal;
        HTMLDialogElement.prototype.showModal = function () {
            if (this.id === "auth-dialog") window.keyAsked += 1;
            return showModal.call(this);
        };""")
    page.goto(router.url + "/dashboard#overview")
    dialog = page.locator("#auth-dialog")
    expect(dialog).to_be_visible()
    snap(page, "api-key", full_page=False)
    page.fill("#api-key-input", "k")
    page.click("#api-key-submit")
    expect(dialog).to_be_hidden()
    expect(node_card(page, "solo").locator(".status-badge")).to_have_text("Online")
    shown = {"trends": '#trends-totals [data-key="requests"]',
             "models": '#models-table tr[data-model="llama3.2:latest"]',
             "apps": '#apps-table tr[data-app="keyed"]', "benchmarks": '#bench-traffic tr[data-node="solo"]',
             "health": "#health-score", "recommendations": "#recommendations-body > *",
             "settings": '#mm-body .mm-node[data-node="solo"]', "requests": "#requests-table tr.req-row"}
    for tab, selector in shown.items():
        page.click(f'[data-tab="{tab}"]')
        expect(page.locator(selector).first).to_be_visible()
        expect(page.locator(f"#{tab}-error")).to_be_hidden()
        expect(dialog).to_be_hidden()
    assert page.evaluate("window.keyAsked") == 1
    page.reload()  # the browser kept the key
    expect(page.locator("#requests-table tr.req-row", has_text="keyed")).to_have_count(1)
    expect(dialog).to_be_hidden()
    assert page.evaluate("window.keyAsked") == 0


def test_overview_follows_the_fleet_without_a_reload(page, make_fake, make_router, start_agent):
    mini, studio, rtx = (make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"]) for _ in range(3))
    router = make_router()
    mini_agent = start_agent(router, "mini", mini, **MINI)
    heartbeat(router, "studio", studio, **STUDIO)
    open_tab(page, router, "overview")
    expect(page.locator("#node-cards .node-card")).to_have_count(2)
    page.evaluate("window.sameDocument = true")
    heartbeat(router, "rtx", rtx, **RTX)
    expect(node_card(page, "rtx").locator(".status-badge")).to_have_text("Online", timeout=5000)
    mini_agent.stop()
    expect(node_card(page, "mini").locator(".status-badge")).to_have_text("Offline", timeout=5000)
    expect(page.locator('#fleet-totals [data-key="nodes_online"] .total-value')).to_have_text("2 / 3")
    assert page.evaluate("window.sameDocument") is True
    snap(page, "overview-refreshed")


def test_unreachable_router_shows_one_line(page, make_fake, make_router):
    fake = make_fake(models={"llama3.2": 2.0}, loaded=["llama3.2"])
    router = make_router(nodes=[("solo", fake.url)])
    open_tab(page, router, "overview")
    expect(node_card(page, "solo")).to_be_visible()
    herd.stop_server(router.server)
    line = page.locator("#alert-unreachable")
    expect(line).to_be_visible(timeout=5000)
    expect(line).to_contain_text(f"herd is not reachable at {router.url}: start herd on the router machine")
    expect(page.locator("#alerts .alert:visible")).to_have_count(1)
    expect(node_card(page, "solo")).to_be_visible()  # the last known fleet stays on screen
    snap(page, "unreachable", full_page=False)
