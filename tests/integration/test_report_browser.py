"""The circuit report in a real browser: headless Chromium driven by Selenium.

Needs ``pip install selenium`` and Chromium + chromedriver (Debian: ``apt-get install chromium
chromium-driver``). Marked ``browser``: without them the test is skipped, with the reason, but
fails when ``CI`` is set, since CI installs them (the check is in tests/conftest.py). Set
``MECHSCOPE_SCREENSHOT_DIR`` to keep a full-page screenshot.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest
import torch

from mechscope.report.circuit import write_circuit

pytestmark = pytest.mark.browser


def _unit_tests():
    """The report unit tests' module (hostile sample data for every page kind), loaded by path."""
    path = Path(__file__).resolve().parents[1] / "unit" / "test_report.py"
    spec = importlib.util.spec_from_file_location("_report_unit_tests", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _synthetic_circuit() -> dict:
    """The hostile synthetic circuit of the unit tests (one definition)."""
    return _unit_tests().synthetic_circuit()


@pytest.fixture()
def driver(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser = next(p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p)
    chromedriver = shutil.which("chromedriver")
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,900", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'chrome-profile'}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(executable_path=chromedriver), options=opts)
    try:
        yield drv
    finally:
        drv.quit()


def test_report_renders_in_chromium(driver, tmp_path):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    page = write_circuit(_synthetic_circuit(), tmp_path / "report.html")
    driver.get(page.resolve().as_uri())

    with pytest.raises(NoAlertPresentException):  # the alert(1) token must not have run
        driver.switch_to.alert.text
    assert driver.execute_script("return typeof window.__pwned") == "undefined"

    graph = driver.find_element(By.ID, "circuit-graph")
    assert len(graph.find_elements(By.CSS_SELECTOR, "path, line")) > 20
    assert graph.size["width"] > 200 and graph.size["height"] > 200
    plot = driver.find_element(By.ID, "faithfulness-plot")
    assert plot.find_elements(By.CSS_SELECTOR, "polyline.faith")
    assert plot.find_elements(By.CSS_SELECTOR, "polyline.random")
    assert len(driver.find_elements(By.CSS_SELECTOR, "svg.heatmap")) == 2
    # Hostile tokens are displayed as text.
    assert "<script>alert(1)</script>" in driver.find_element(By.CSS_SELECTOR, ".prompt pre").text

    # The JS tooltip: hovering a circuit node shows its name and highlights its edges.
    node = graph.find_element(By.CSS_SELECTOR, ".node.head.on")
    ActionChains(driver).move_to_element(node).perform()
    tip = driver.find_element(By.ID, "tooltip")
    assert tip.is_displayed() and node.get_attribute("data-n") in tip.text and "score" in tip.text
    assert "focus" in graph.get_attribute("class")
    ActionChains(driver).move_to_element(driver.find_element(By.TAG_NAME, "h1")).perform()
    assert not tip.is_displayed()

    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, min(int(height) + 40, 8000))
    shot = tmp_path / "report.png"
    assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("MECHSCOPE_SCREENSHOT_DIR"):
        shutil.copy(shot, Path(os.environ["MECHSCOPE_SCREENSHOT_DIR"]) / "report.png")

    severe = [entry for entry in driver.get_log("browser") if entry.get("level") == "SEVERE"]
    assert not severe, severe


def test_attribution_page_in_chromium(driver, tmp_path, tiny_llama):
    """The attribution graph page: drawn, a click selects a node and lists its links, the
    hostile token stays text, and the console has no errors."""
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    from mechscope.features.attribute import attribute
    from mechscope.features.graph_files import graph_json
    from mechscope.features.prune import prune
    from mechscope.features.transcoder_set import random_transcoders
    from mechscope.report.attribution import write_attribution

    tset = random_transcoders(tiny_llama, d_sae=32, k=4, seed=3)
    toks = [tiny_llama.tokenizer.bos_token_id] + tiny_llama.to_tokens("When Mary and John went")
    g = attribute(tiny_llama, tset, toks, batch_size=16)
    g.token_text = ["<img src=x onerror=window.__pwned=1>"] + g.token_text[1:]
    doc = graph_json(g, prune(g), tiny_llama.tokenizer, "t", "<script>window.__pwned=1</script>", "scan", 0.8)
    from mechscope.features.cards import feature_cards

    feats = sorted({(int(n["layer"]), int(n["feature"])) for n in doc["nodes"] if n["feature_type"] == "cross layer transcoder"})
    cards = feature_cards(tiny_llama, tset, feats, torch.tensor([toks, toks[::-1]]))
    for card in cards.values():
        for ex in card["contexts"]:
            ex["tokens"][0] = "<img src=x onerror=window.__pwned=2>"
    from mechscope.features.qk import qk_attribution

    qk = [qk_attribution(tiny_llama, tset, torch.tensor(toks), 1, 0, len(toks) - 1, 1).to_dict()]
    qk[0]["top_pairs"][0]["query_label"] = "<img src=x onerror=window.__pwned=3>"
    page = write_attribution(doc, tmp_path / "attribution.html", qk=qk, cards=cards)
    driver.get(page.resolve().as_uri())
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text
    assert driver.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1"
    svg = driver.find_element(By.CSS_SELECTOR, "#graph svg")
    nodes = svg.find_elements(By.CSS_SELECTOR, ".node")
    assert len(nodes) == len(doc["nodes"]) and len(svg.find_elements(By.CSS_SELECTOR, "path.edge")) == len(doc["links"])
    # one row per layer and the logits right above the last (the schema stores them at n_layers + 1)
    rows = [t.text for t in svg.find_elements(By.CSS_SELECTOR, "text.lay")]
    assert rows == ["emb", *[f"L{layer}" for layer in range(tiny_llama.summary.n_layers)], "logit"], rows
    logit = svg.find_element(By.CSS_SELECTOR, ".node.logit")
    driver.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))", logit)
    side = driver.find_element(By.ID, "side").text
    assert "Output" in side and "strongest inputs" in side
    assert "sel" in logit.get_attribute("class")
    assert "<img src=x onerror=window.__pwned=1>" in svg.text
    feature = svg.find_element(By.CSS_SELECTOR, ".node.feature")
    driver.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))", feature)
    side = driver.find_element(By.ID, "side")
    assert "output tokens it promotes" in side.text and "top-activating corpus contexts" in side.text
    assert side.find_elements(By.CSS_SELECTOR, ".ctx span.at")  # an exemplar drawn, its token marked
    assert "<img src=x onerror=window.__pwned=2>" in side.text
    arc = svg.find_element(By.CSS_SELECTOR, "path.qkarc")  # the QK edge drawn on the graph
    driver.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))", arc)
    side = driver.find_element(By.ID, "side")
    assert f"QK: layer 1, head 0, query @{len(toks) - 1} reads key @1" in side.text
    assert "<img src=x onerror=window.__pwned=3>" in side.text
    in_graph = {n["node_id"] for n in doc["nodes"]}
    marked = svg.find_elements(By.CSS_SELECTOR, ".node.qkq, .node.qkk")
    assert len(marked) == len(in_graph & {c["id"] for c in qk[0]["query_side"] + qk[0]["key_side"]}) > 0
    assert driver.execute_script("return typeof window.__pwned") == "undefined"
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def test_vision_page_in_chromium(driver, tmp_path):
    """A real circuit of a tiny random CNN (hostile concept name): its inline PNGs decode, the edge view is drawn, nothing runs."""
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    from mechscope.report.vision import write_vision
    from mechscope.vision.circuit import find_circuit
    from mechscope.vision.concept import Concept
    from mechscope.vision.config import CircuitConfig, DataConfig, TrainConfig
    from mechscope.vision.data import build_dataset
    from mechscope.vision.models import VisionModel, build_model

    cfg = TrainConfig(arch="cnn", width=8, data=DataConfig(dataset="shapes", size=16, per_class=10))
    vm = VisionModel(build_model(cfg, cfg.data.n_classes), cfg, cfg.data.class_names(), {})
    ds = build_dataset(cfg.data)
    evil = "<script>alert(1)</script>"
    concept = Concept(evil, ds.train.of_class(1), 1, vm.classes[1], ds.test.of_class(1), evil)
    circ = find_circuit(vm, concept, CircuitConfig(k=2, top_images=3), reference=ds.test.images[:40])
    page = write_vision(circ.to_dict(), tmp_path / "vision.html")
    driver.get(page.resolve().as_uri())
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text
    assert evil in driver.find_element(By.TAG_NAME, "h1").text
    images = driver.find_elements(By.CSS_SELECTOR, ".vimgs image")
    assert len(images) == 4 * 2 * 3
    sizes = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "const uris = [...document.querySelectorAll('.vimgs image')].map(e => e.getAttribute('href'));"
        "Promise.all(uris.map(u => new Promise(r => { const i = new Image(); i.onload = () => r([i.naturalWidth, i.naturalHeight]);"
        " i.onerror = () => r([0, 0]); i.src = u; }))).then(done);")
    assert sizes == [[16, 16]] * len(images)
    edges = driver.find_element(By.CSS_SELECTOR, "svg.vedges")
    assert len(edges.find_elements(By.TAG_NAME, "line")) > 0 and edges.size["width"] > 400


def test_every_page_kind_keeps_hostile_tokens_inert_in_chromium(driver, tmp_path):
    """Each page of the unit tests' escaping test, rendered from their sample data full of tokens that hold markup
    and script, opened in Chromium: no script of a token ran, no element of a token exists, the
    tokens are shown as text, and the console has no errors."""
    import importlib

    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    unit = _unit_tests()
    pages = unit._pages()
    assert len(pages) >= 19
    for i, (module, name, data, _) in enumerate(pages):
        html = getattr(importlib.import_module(f"mechscope.report.{module}"), f"render_{name}")(data)
        path = tmp_path / f"{i}-{name}.html"
        path.write_text(html, encoding="utf-8")
        driver.get(path.resolve().as_uri())
        with pytest.raises(NoAlertPresentException):
            driver.switch_to.alert.text
        assert driver.execute_script("return typeof window.__pwned") == "undefined", name
        assert not driver.find_elements(By.CSS_SELECTOR, "img[src='x']"), name
        body = driver.find_element(By.TAG_NAME, "body").get_attribute("textContent")
        assert "<script>" in body, name  # the hostile tokens are there, as text
        severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        assert not severe, (name, severe)
