"""The server explainer against a real OpenAI-compatible server: llama-cpp-python's
``llama_cpp.server`` (from ``.venv-llama``, built by ``./setup.sh --test``) serving the embedded
GGUF on 127.0.0.1, started and stopped here. The descriptions a 135M model writes are weak (the
README says so); what these tests pin down is the plumbing a stub would not have: the real client
library talks to a real server, greedy samples are reproducible and the others are sampled, the
exemplars of the embedded model go in and descriptions come out into the database, and a server
that is too slow or gone is one sentence with everything already stored kept."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mechscope.cli.main import app
from mechscope.errors import MechscopeError
from mechscope.explain.config import ExemplarsConfig
from mechscope.explain.db import UnitDB
from mechscope.explain.describe import DescribeConfig, describe
from mechscope.explain.exemplars import harvest_exemplars
from mechscope.explain.explainers import make_explainer
from mechscope.explain.explainers.base import SYSTEM_PROMPT, explain_prompt
from mechscope.explain.types import Exemplar, UnitRecord, UnitRef
from mechscope.models.load import embedded_gguf_path

pytestmark = [pytest.mark.llama_server, pytest.mark.embedded]
ALIAS = "smollm2"
ROOT = Path(__file__).resolve().parents[2]
LLAMA_PY = Path(os.environ.get("MECHSCOPE_LLAMA_PYTHON", ROOT / ".venv-llama" / "bin" / "python"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(log: Path) -> tuple[subprocess.Popen, str]:
    """llama_cpp.server on the embedded GGUF at a free port of 127.0.0.1, once it answers."""
    port = _free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen([str(LLAMA_PY), "-m", "llama_cpp.server", "--model", str(embedded_gguf_path()),
                                 "--model_alias", ALIAS, "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048",
                                 "--n_threads", "2", "--verbose", "false"], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=2) as r:
                served = [m["id"] for m in json.load(r)["data"]]
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"llama_cpp.server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.3)
    assert served == [ALIAS]
    return proc, url


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc, url = _start(tmp_path_factory.mktemp("llama") / "server.log")
    yield url
    _stop(proc)


def _word_unit(i: int, word: str) -> tuple[UnitRecord, list[Exemplar]]:
    """A unit that fires (2.0) exactly on ``word`` in a few plain sentences."""
    sentences = [f"We walked along the{word} and talked about the weather.", f"She said the{word} was there before us.",
                 f"Nobody knew why the{word} mattered so much to him."]
    ex = []
    for s in sentences:
        toks = [" " + t for t in s.split()]
        toks[0] = toks[0].lstrip()
        acts = [2.0 if t == word else 0.0 for t in toks]
        ex.append(Exemplar(toks, acts, focus=acts.index(2.0), kind="top", split="train"))
    return UnitRecord(UnitRef("mlp", 0, i), 2.0, 0.0, 0.1), ex


def test_real_server_describes_units_greedy_reproducibly(server):
    url = server
    ex = make_explainer("server", server=url, server_model=ALIAS, concurrency=4, timeout=60.0)
    items = [_word_unit(i, w) for i, w in enumerate((" river", " castle", " doctor", " garden"))]
    first = ex.explain_many(items, n_samples=3)
    again = ex.explain_many(items, n_samples=1)
    ex.close()
    assert all(1 <= len(d) <= 3 and all(t.strip() for t in d) for d in first)
    assert [d[0] for d in again] == [d[0] for d in first]  # sample 0 is greedy: the same text twice
    assert any(len(d) > 1 for d in first)  # samples 1.. are drawn at temperature 0.7: they differ somewhere
    assert len({d[0] for d in first}) > 1  # the prompt reaches the model: different units, different answers


def test_describe_embedded_exemplars_then_the_server_goes_away(embedded, tmp_path):
    proc, url = _start(tmp_path / "server.log")  # its own server: this test stops it
    try:
        _describe_then_stop(proc, url, embedded, tmp_path)
    finally:
        _stop(proc)


def _describe_then_stop(proc, url, embedded, tmp_path):
    db_path = tmp_path / "u.db"
    db = UnitDB(db_path, model_id=embedded.summary.name)
    harvest_exemplars(embedded, ExemplarsConfig(layers=[5], unit_range=(0, 4), n_tokens=2048, batch_size=8), db=db)
    units = db.units()
    assert len(units) == 4
    # The real server refuses the full prompt of at least one of these neurons (2,048-token
    # context), so describing them below goes through the explainer's shrinking path.
    refused = 0
    for u in units:
        body = json.dumps({"model": ALIAS, "max_tokens": 60, "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": explain_prompt(db.unit(u), [e for e in db.exemplars(u) if e.split == "train"])}]})
        req = urllib.request.Request(f"{url}/chat/completions", body.encode(), {"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(req, timeout=120).close()
        except urllib.error.HTTPError as e:
            assert e.code == 400 and "context_length_exceeded" in e.read().decode()
            refused += 1
    assert refused >= 1
    ex = make_explainer("server", server=url, server_model=ALIAS, timeout=0.001, retries=0)
    with pytest.raises(MechscopeError, match="did not answer within 0.001 s"):
        describe(db, units[:1], ex, None, DescribeConfig(scorers=()))
    ex.close()
    assert not db.described("server", ex.settings_key)
    db.close()

    args = ["describe", "--db", str(db_path), "--explainer", "server", "--server", url, "--model", ALIAS,
            "--scorer", "none", "--timeout", "60"]
    r = CliRunner().invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["described"] == 4
    store = UnitDB(db_path)
    ex_key = make_explainer("server", server=url, server_model=ALIAS).settings_key
    done = store.described("server", ex_key)
    assert done == set(units)
    texts = [store.descriptions(u)[0] for u in sorted(done)]
    assert all(d.text.strip() and d.explainer == "server" for d in texts)
    store.close()

    _stop(proc)
    # another explainer setting (the model name), so every unit is still to do: the run must reach the server
    r = CliRunner().invoke(app, [*args, "--timeout", "5", "--model", "another-alias"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "Could not connect to the server" in r.output, r.output
    store = UnitDB(db_path)
    assert store.described("server", ex_key) == done  # nothing stored was lost
    assert [store.descriptions(u)[0].text for u in sorted(done)] == [d.text for d in texts]
