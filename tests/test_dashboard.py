"""The dashboard in real headless Chromium against a real 3-node mesh (issue 12).

One mesh of three subprocess nodes and one browser serve the whole module; the tests run
in file order (the kill test restarts the node it kills). Without Chromium (and no way to
install it) the browser tests skip with the reason; the JSON tests still run.
"""

from __future__ import annotations

import datetime
import os
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.browser_util import (
    chromium,
    ensure_chromium,
    link_states,
    node_states,
    sign_in,
)
from tests.helpers import ADMIN, ProcessNode, wait_for
from tests.repl_util import has_table, join, wait_linked

# The first browser test may install Chromium on a fresh machine (apt-get, in its set-up):
# that can take more than the default 120 s.
browser_test = pytest.mark.timeout(600)

NAMES = ("node-a", "node-b", "node-c")
ALL_LINKS = {(a, b) for a in NAMES for b in NAMES if a != b}
READER = {"super_user": False,
          "data": {"tables": {"dog": {"read": True, "insert": False, "update": False,
                                      "delete": False, "attribute_permissions": []}}}}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ProcessNode]]:
    root: Path = tmp_path_factory.mktemp("dashboard")
    nodes = [ProcessNode(name, root / name) for name in NAMES]
    try:
        with ThreadPoolExecutor(len(nodes)) as pool:  # three start-ups at once
            list(pool.map(ProcessNode.start, nodes))
        a = nodes[0]
        a.call("create_table", database="data", table="dog", primary_key="id")
        a.call("create_table", database="data", table="cat", primary_key="id")
        a.call("insert", database="data", table="dog",
               records=[{"id": i, "name": f"dog-{i}"} for i in range(25)])
        for other in nodes[1:]:
            a.call("add_node", hostname=other.name, url=other.repl_url, verify_tls=False,
                   authorization={"username": ADMIN[0], "password": ADMIN[1]})
        a.call("add_role", role="reader", permission=READER)
        a.call("add_user", role="reader", username="viewer", password="viewer-pw", active=True)
        for node in nodes:
            wait_for(lambda node=node: _streaming(node), timeout=30,
                     message=f"{node.name} streaming from both peers")
        yield nodes
    finally:
        for node in nodes:
            node.close()


@pytest.fixture(scope="module")
def browser(mesh: list[ProcessNode]) -> Iterator[Any]:
    reason = ensure_chromium()
    if reason is not None:
        pytest.skip(f"no headless Chromium: {reason}")
    with chromium() as driver:
        yield driver


def _streaming(node: ProcessNode) -> bool:
    status = node.call("cluster_status")
    sockets = [s for c in status["connections"] for s in c["database_sockets"]]
    peers = {c["name"] for c in status["connections"] if c["database_sockets"]}
    return len(peers) == 2 and all(s["state"] == "streaming" and s["connected"]
                                   for s in sockets)


def _links(mesh: list[ProcessNode]) -> dict[tuple[str, str], str]:
    """``{(from, to): status}`` of every link in ``cluster_overview``'s answer."""
    overview = mesh[0].call("cluster_overview")
    out: dict[tuple[str, str], str] = {}
    for node in overview["nodes"]:
        for link in node["links"]:
            out.setdefault((link["peer"], node["name"]), link["status"])
    return out


def _admin_page(driver: Any, node: ProcessNode) -> None:
    """Show ``node``'s dashboard signed in as admin (each browser test can run alone)."""
    shown = driver.execute_script(
        "const m = document.getElementById('main'); const w = document.getElementById('who');"
        "return m && !m.hidden && w && w.textContent.startsWith('admin') ? location.href : '';")
    if not shown.startswith(node.url + "dashboard"):
        sign_in(driver, node.url, *ADMIN)


def _accept_confirm(driver: Any) -> str:
    alert = wait_for(lambda: driver.switch_to.alert, timeout=5, message="the confirm dialog")
    text = str(alert.text)
    alert.accept()
    return text


# -- the data: cluster_overview -----------------------------------------------------------
def test_cluster_overview_gathers_every_node(mesh):
    """cluster_overview on one node reports all three nodes, their links and record counts."""
    overview = mesh[0].call("cluster_overview")
    assert overview["node_name"] == "node-a"
    assert {n["name"] for n in overview["nodes"]} == set(NAMES)
    assert all(n["reachable"] for n in overview["nodes"])
    wait_for(lambda: set(_links(mesh).items()) == {(pair, "streaming") for pair in ALL_LINKS},
             timeout=10, message="all six links streaming in cluster_overview")
    for node in overview["nodes"]:
        assert node["tables"]["data"]["cat"] == 0
    wait_for(lambda: all(n["tables"]["data"]["dog"] == 25
                         for n in mesh[0].call("cluster_overview")["nodes"]),
             timeout=10, message="25 dogs counted on every node")
    link = overview["nodes"][1]["links"][0]
    assert {"peer", "database", "status", "latency", "lag_ms", "lag_txns",
            "txns_received"} <= set(link)


def test_cluster_overview_rejects_bad_input_and_filters_tables_for_readers(mesh):
    """Bad parameters are a 400 naming them; a reader sees only tables it may read."""
    for body in ({"timeout": "soon"}, {"timeout": 0}, {"peers": "yes"}):
        response = mesh[0].post({"operation": "cluster_overview", **body})
        assert response.status_code == 400, response.text
        assert next(iter(body)) in response.json()["error"]
    response = mesh[1].post({"operation": "cluster_overview"}, auth=("viewer", "viewer-pw"))
    assert response.status_code == 200, response.text
    overview = response.json()
    assert overview["user"] == {"username": "viewer", "super_user": False}
    assert all(n["tables"] == {"data": {"dog": 25}} for n in overview["nodes"])
    assert mesh[1].post({"operation": "cluster_overview"},
                        auth=("viewer", "wrong")).status_code == 401
    # A role that names no database sees the mesh (system links) but no table or database.
    mesh[0].call("add_role", role="watcher", permission={"super_user": False})
    mesh[0].call("add_user", role="watcher", username="watch", password="watch-pw", active=True)
    response = mesh[0].post({"operation": "cluster_overview"}, auth=("watch", "watch-pw"))
    assert response.status_code == 200, response.text
    nodes = response.json()["nodes"]
    assert len(nodes) == 3 and all(n["tables"] == {} for n in nodes)
    assert {link["database"] for n in nodes for link in n["links"]} == {"system"}


def test_dashboard_page_is_static_and_self_contained(mesh):
    """/dashboard serves the page without data, with a strict CSP and no outside URL."""
    page = mesh[0].client.get(mesh[0].url + "dashboard")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    for name in ("dashboard.js", "dashboard.css"):
        asset = mesh[0].client.get(mesh[0].url + "dashboard/" + name)
        assert asset.status_code == 200, name
        text = asset.text.replace("'http://www.w3.org/2000/svg'", "")  # a name, not a fetch
        assert "http://" not in text and "https://" not in text, name
    assert "https://" not in page.text
    missing = mesh[0].client.get(mesh[0].url + "dashboard/../config.yaml")
    assert missing.status_code == 404
    assert mesh[0].client.get(mesh[0].url + "dashboard/x.js").status_code == 404


# -- the page in Chromium -----------------------------------------------------------------
@browser_test
def test_page_draws_every_node_and_link_streaming(mesh, browser):
    """Signed in on node-a, the page draws three nodes and six streaming links."""
    sign_in(browser, mesh[0].url, *ADMIN)
    wait_for(lambda: node_states(browser) == {n: "up" for n in NAMES}, timeout=10,
             message="three nodes drawn up")
    wait_for(lambda: link_states(browser) == {pair: "streaming" for pair in ALL_LINKS},
             timeout=10, message="six links drawn streaming")
    cells = browser.execute_script(
        "return [...document.querySelectorAll('#records tr[data-table=\"data.dog\"] td')]"
        ".map(td => td.textContent);")
    assert cells == ["data.dog", "25", "25", "25"]
    # The dead-letter, conflict and verify sections show exactly when the node has them.
    has = set(mesh[0].call("cluster_overview", peers=False)["operations"])
    expected = {"dead-card": "list_dead_letters" in has,
                "conflicts-card": "list_conflicts" in has,
                "verify-card": bool(has & {"verify_cluster", "repair_cluster"})}
    shown = ("const ids = ['dead-card','conflicts-card','verify-card'];"
             "return Object.fromEntries(ids.map(id => [id, !document.getElementById(id).hidden]));")
    wait_for(lambda: browser.execute_script(shown) == expected, timeout=10,
             message=f"optional sections shown as {expected}")


@browser_test
def test_pause_and_resume_a_link_from_the_page(mesh, browser):
    """Pause on the node-b → node-a row asks first, then cluster_status reports it paused."""
    from selenium.webdriver.common.by import By

    _admin_page(browser, mesh[0])

    def button() -> Any:
        return browser.find_element(
            By.CSS_SELECTOR, '#links tr[data-from="node-b"][data-to="node-a"] button')

    wait_for(lambda: button().text == "Pause", timeout=10, message="a Pause button")
    wait_for(lambda: button().click() or True, timeout=5, message="a click on the button")
    assert "node-b" in _accept_confirm(browser)

    def paused() -> bool:
        status = mesh[0].call("cluster_status")
        conn = next(c for c in status["connections"] if c["name"] == "node-b")
        return all(s["state"] == "paused" for s in conn["database_sockets"])

    wait_for(paused, timeout=10, message="cluster_status on node-a to report node-b paused")
    wait_for(lambda: link_states(browser).get(("node-b", "node-a")) == "paused", timeout=5,
             message="the line drawn paused")
    wait_for(lambda: button().text == "Resume", timeout=5, message="a Resume button")
    wait_for(lambda: button().click() or True, timeout=5, message="a click on the button")
    _accept_confirm(browser)
    wait_for(lambda: link_states(browser).get(("node-b", "node-a")) == "streaming",
             timeout=15, message="the link streaming again")


@browser_test
def test_killed_node_links_turn_down_then_recover(mesh, browser):
    """SIGKILL node-c: its node and four links are drawn down within 5 s; back after restart."""
    _admin_page(browser, mesh[0])
    wait_for(lambda: link_states(browser) == {pair: "streaming" for pair in ALL_LINKS},
             timeout=15, message="six links streaming before the kill")
    victim = mesh[2]
    victim.kill()
    touching = {pair for pair in ALL_LINKS if victim.name in pair}

    def down() -> bool:
        links = link_states(browser)
        return (node_states(browser).get(victim.name) == "down"
                and all(links.get(pair) == "down" for pair in touching)
                and links.get(("node-a", "node-b")) == "streaming")

    wait_for(down, timeout=5, message="node-c and its links drawn down within 5 s")
    victim.start()
    wait_for(lambda: node_states(browser).get(victim.name) == "up"
             and link_states(browser) == {pair: "streaming" for pair in ALL_LINKS},
             timeout=30, message="node-c and its links back to streaming")


@browser_test
def test_page_turns_stale_when_its_node_stops_answering(mesh, browser):
    """With the node serving the page frozen (SIGSTOP: its requests hang, nothing
    refuses them), the page stops claiming to be live within seconds; it is live again
    once the node answers."""
    _admin_page(browser, mesh[0])
    live = "const l = document.getElementById('live'); return [l.className, l.textContent];"
    wait_for(lambda: browser.execute_script(live)[0] == "live ok", timeout=10,
             message="the page live")
    pid = mesh[0].proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: browser.execute_script(live)[0] == "live stale", timeout=10,
                 message="the page marked stale while its node hangs")
        assert "no update" in browser.execute_script(live)[1]
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: browser.execute_script(live)[0] == "live ok", timeout=20,
             message="the page live again")


@browser_test
def test_read_only_user_sees_the_mesh_without_controls(mesh, browser):
    """A user without super_user sees nodes and links but no pause, resume or verify."""
    from selenium.webdriver.common.by import By

    logout = browser.find_elements(By.ID, "logout")
    if logout and logout[0].is_displayed():  # signed in by the earlier tests
        logout[0].click()
        wait_for(lambda: browser.find_element(By.ID, "login-form").is_displayed(), timeout=5,
                 message="the sign-in form")
    sign_in(browser, mesh[1].url, "viewer", "viewer-pw")
    wait_for(lambda: len(link_states(browser)) == 6, timeout=10,
             message="six links drawn for the reader")
    assert "read only" in browser.find_element(By.ID, "who").text
    assert browser.find_elements(By.CSS_SELECTOR, "#links button") == []
    assert not browser.find_element(By.ID, "verify-controls").is_displayed()
    assert all(not th.is_displayed()
               for th in browser.find_elements(By.CSS_SELECTOR, "#links .controls-col"))


@browser_test
@pytest.mark.timeout(120)
def test_repair_from_the_page_reports_what_it_repaired(node_factory, browser):
    """Rows one node lacks (its subscription widened with start_time) are repaired by the
    page's Repair button, which then says how many records it wrote instead of
    reporting the differences it found before repairing them as 'Not in sync'."""
    from selenium.webdriver.common.by import By

    c = node_factory("node-c", env={"REPLICATION_VERIFYINTERVAL": "0"})
    d = node_factory("node-d", env={"REPLICATION_VERIFYINTERVAL": "0"})
    for table in ("t1", "gap"):
        c.call("create_table", database="data", table=table, primary_key="id")
    c.call("insert", database="data", table="gap", records=[{"id": i} for i in range(5)])
    join(d, c, subscriptions=[{"database": "data", "table": "t1", "subscribe": True,
                               "publish": True}])
    wait_for(lambda: has_table(d, "gap"), timeout=20, message="the table on node-d")
    now = datetime.datetime.now(datetime.UTC).isoformat()
    d.call("set_node_replication", hostname=c.name, start_time=now, subscriptions=[
        {"database": "data", "table": "gap", "subscribe": True, "publish": True}])
    wait_linked([(d, c), (c, d)], ("system", "data"))
    assert d.call("verify_cluster", database="data", table="gap")["in_sync"] is False

    sign_in(browser, d.url, *ADMIN)
    button = wait_for(lambda: (b := browser.find_element(By.ID, "repair-button"))
                      .is_displayed() and b, timeout=10, message="the Repair button")
    button.click()
    _accept_confirm(browser)

    def outcome() -> str:
        text = str(browser.find_element(By.ID, "verify-result").text)
        return "" if not text or "running" in text else text

    text = wait_for(outcome, timeout=60, message="the repair's outcome on the page")
    assert "Not in sync" not in text and "Repaired: 5 records" in text, text
    assert d.call("verify_cluster", database="data", table="gap")["in_sync"] is True


@browser_test
@pytest.mark.timeout(120)
def test_dead_letter_card_counts_them_all_not_the_page_it_shows(node_factory, browser):
    """With 60 dead letters (dest_wins refusals) the card says 60, though it asks for
    and lists only the first 50."""
    from selenium.webdriver.common.by import By

    e = node_factory("node-e")
    f = node_factory("node-f")
    f.call("create_table", database="dl", table="mine", primary_key="id")
    join(e, f, subscriptions=[{"database": "dl", "table": "mine", "subscribe": True,
                               "publish": True, "conflict": "dest_wins"}])
    wait_for(lambda: has_table(e, "mine", "dl"), timeout=20, message="the table on node-e")
    wait_linked([(e, f), (f, e)], ("system", "dl"))
    ids = list(range(60))
    e.call("upsert", database="dl", table="mine", records=[{"id": i, "v": "e"} for i in ids])
    wait_for(lambda: f.count("mine", "dl") == 60, timeout=20, message="node-e's rows on f")
    f.call("upsert", database="dl", table="mine", records=[{"id": i, "v": "f"} for i in ids])
    wait_for(lambda: e.call("list_dead_letters")["summary"]["total"] == 60, timeout=20,
             message="60 refusals dead-lettered on node-e")

    sign_in(browser, e.url, *ADMIN)
    headline = "#dead-letters > p"
    wait_for(lambda: browser.find_element(By.CSS_SELECTOR, headline).text, timeout=15,
             message="the dead-letter card")
    assert browser.find_element(By.CSS_SELECTOR, headline).text == "60 entries"


def test_link_status_names_each_state_the_page_colours():
    """Each cluster_status socket maps to one dashboard state; a stale backlog is catching up."""
    from operations.dashboard import link_status

    streaming = {"state": "streaming", "connected": True, "lag_txns": 0, "lag_ms": 0}
    assert link_status(streaming) == "streaming"
    assert link_status({**streaming, "lag_txns": 3, "lag_ms": 40}) == "streaming"
    assert link_status({**streaming, "lag_txns": 3, "lag_ms": 2500}) == "catching_up"
    assert link_status({**streaming, "state": "copying"}) == "copying"
    assert link_status({**streaming, "state": "connecting", "connected": False}) == "down"
    for state in ("paused", "resync_required", "clock_skew"):
        assert link_status({**streaming, "state": state, "connected": False}) == state
