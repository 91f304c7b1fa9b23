"""Session 37's sweeps: results that must not depend on batch size, and the unit database,
search, web UI and explainers under awkward input. Each test fails on the code before the fix."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from mechscope.errors import MechscopeError
from mechscope.explain.db import UnitDB
from mechscope.explain.describe import DescribeConfig, describe
from mechscope.explain.explainers import make_explainer
from mechscope.explain.types import Description, Exemplar, UnitRecord, UnitRef

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
from fake_chat_server import FakeChatServer  # noqa: E402


def _describe_module():
    spec = importlib.util.spec_from_file_location("_describe_tests", Path(__file__).with_name("test_explain_describe.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _one_sentence(msg: str) -> bool:
    return "Traceback" not in msg and msg.count("\n") == 0


# ------------------------------------------------------------------ describe: one unit's failure does not block the rest


def test_a_unit_the_server_always_refuses_leaves_the_others_described(tmp_path):
    dm = _describe_module()
    db = dm._db(tmp_path / "u.db")  # 8 units; unit 2's exemplars mark " seven"
    with FakeChatServer("poison") as srv:
        ex = make_explainer("server", server=srv.url, server_model="fake", retries=0)
        res = describe(db, db.units(), ex, None, DescribeConfig(scorers=(), chunk=3))
        assert res.described == 7 and list(res.failed) == ["mlp/0/2"]
        assert "HTTP 500" in res.failed["mlp/0/2"] and "retries only the failed ones" in res.note
        assert db.described("server", ex.settings_key) == {UnitRef("mlp", 0, i) for i in range(8)} - {UnitRef("mlp", 0, 2)}
        # A rerun tries only the failed unit; a chunk whose every unit fails stops with one sentence.
        srv.requests.clear()
        with pytest.raises(MechscopeError, match="HTTP 500") as err:
            describe(db, db.units(), ex, None, DescribeConfig(scorers=(), chunk=3))
        assert len(srv.requests) == 1 and _one_sentence(str(err.value))
        srv.mode = "ok"
        assert describe(db, db.units(), ex, None, DescribeConfig(scorers=(), chunk=3)).described == 1
        ex.close()


def test_server_content_that_is_not_text_is_one_sentence(tmp_path):
    dm = _describe_module()
    db = dm._db(tmp_path / "u.db", n_units=2)
    with FakeChatServer("number") as srv:
        ex = make_explainer("server", server=srv.url, server_model="fake", retries=0)
        with pytest.raises(MechscopeError, match="content is a int, not text") as err:
            describe(db, db.units(), ex, None, DescribeConfig(scorers=(), chunk=3))
        ex.close()
    assert _one_sentence(str(err.value))


def test_rate_limit_advice_names_the_rate_not_the_model():
    import httpx
    import openai

    from mechscope.explain.explainers.server import ServerExplainer

    ex = ServerExplainer("http://127.0.0.1:9/v1", "fake", retries=0)
    resp = httpx.Response(429, request=httpx.Request("POST", "http://127.0.0.1:9/v1/chat/completions"))
    err = openai.RateLimitError("slow down", response=resp, body={"error": {"message": "slow down"}})
    ex.client.chat.completions.create = lambda **kw: (_ for _ in ()).throw(err)  # type: ignore[method-assign]
    with pytest.raises(MechscopeError, match="lower --concurrency") as e:
        ex._ask("hi", 0)
    assert "check --model" not in str(e.value)
    ex.close()


def test_local_explainer_refuses_a_prompt_past_its_positions_in_one_sentence(tiny_gpt2):
    from mechscope.explain.explainers.base import UnitFailed
    from mechscope.explain.explainers.local import LocalExplainer

    dm = _describe_module()
    ex = LocalExplainer(tiny_gpt2, max_new_tokens=4)  # 64 positions: the instructions alone do not fit
    train = [e for e in dm._unit_exemplars(0) if e.split == "train"]
    with pytest.raises(UnitFailed, match="reads at most 64 positions") as err:
        ex.explain(UnitRecord(UnitRef("mlp", 0, 0), 2.0, 0.0, 0.1), train)
    assert _one_sentence(str(err.value))


def test_baseline_does_not_call_a_dead_unit_a_token_detector():
    from mechscope.explain.explainers.baseline import BaselineExplainer

    toks = [" When", " Mary", " and", " John", " went"]
    for act in (0.0, -1.0):
        train = [Exemplar(tokens=toks, acts=[act] * 5, focus=3, kind="top", split="train") for _ in range(5)]
        assert BaselineExplainer().phrase(train) == "no activating tokens seen"


def test_pearson_does_not_depend_on_the_scale():
    from mechscope.explain.scoring import pearson

    x, y = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0], [0.1, 1.1, 2.0, 3.2, 3.9, 5.1]
    want = pearson(x, y)
    assert want > 0.99
    for s in (1e-3, 1e-7, 1e-12):
        assert pearson([s * a for a in x], y) == pytest.approx(want, rel=1e-9)
    assert pearson([1e-7] * 6, y) == 0.0 and pearson([0.0] * 6, y) == 0.0


# ------------------------------------------------------------------ the database: stale descriptions, NaN, later layers


def _two_unit_db(path) -> UnitDB:
    db = UnitDB(path, model_id="synthetic")
    refs = [UnitRef("mlp", 0, i) for i in range(2)]
    db.set_unit_count("mlp", "", 0, 2)
    db.put_units([UnitRecord(unit=r, max_act=2.0, min_act=0.0, density=0.2) for r in refs])
    ex = [Exemplar([" a", " Paris"], [0.0, 2.0], focus=1, kind="top", split="test")]
    for r in refs:
        db.put_exemplars(r, ex)
    return db


def test_search_and_the_ui_prefer_a_units_current_description_over_a_stale_one(tmp_path):
    from mechscope.server.app import best_description

    db = _two_unit_db(tmp_path / "u.db")
    u0, u1 = UnitRef("mlp", 0, 0), UnitRef("mlp", 0, 1)
    for u in (u0, u1):
        db.put_description(Description(u, "Paris Paris city of Paris", "baseline", scores={"simulation": 0.9}))
    other = [Exemplar([" b", " Paris"], [0.0, 3.0], focus=1, kind="top", split="test")]
    for u in (u0, u1):
        db.put_exemplars(u, other)  # a new exemplars pass: the descriptions above are stale
    db.put_description(Description(u0, "Paris", "baseline", scores={"simulation": 0.1}))  # current, ranked lower
    hits = {h.unit: h.description for h in db.search("Paris")}
    assert hits[u0].text == "Paris" and not hits[u0].stale
    assert hits[u1].stale  # only a stale one matches: shown, and marked
    assert best_description(db.descriptions(u0)).text == "Paris"


def test_scores_that_are_not_finite_are_refused_and_search_keeps_working(tmp_path):
    db = _two_unit_db(tmp_path / "u.db")
    u0 = UnitRef("mlp", 0, 0)
    did = db.put_description(Description(u0, "cities", "baseline", scores={"simulation": 0.5}))
    for bad in (math.nan, math.inf, "x"):
        with pytest.raises(MechscopeError, match="not a finite number") as err:
            db.update_scores(did, {"simulation": bad})  # type: ignore[dict-item]
        assert _one_sentence(str(err.value))
    with pytest.raises(MechscopeError, match="not a finite number"):
        db.put_description(Description(u0, "towns", "baseline", scores={"detection": math.nan}))
    assert [h.description.text for h in db.search("cities")] == ["cities"]
    json.loads(json.dumps(db.descriptions(u0)[0].scores, allow_nan=False))


def test_a_long_lived_reader_sees_layers_added_later(tmp_path):
    from mechscope.server.store import ReadOnlyUnitDB

    db = _two_unit_db(tmp_path / "u.db")
    reader = ReadOnlyUnitDB(tmp_path / "u.db")
    with pytest.raises(MechscopeError, match="layer 1 has no mlp units"):
        reader.check_unit(UnitRef("mlp", 1, 0))
    db.set_unit_count("mlp", "", 1, 4)  # another process adds a layer
    reader.check_unit(UnitRef("mlp", 1, 3))
    reader.close()
    db.close()


def test_semantic_search_ranks_by_the_scores_written_after_it_loaded(tmp_path):
    from mechscope.explain.semantic import embed_descriptions, semantic_search

    spec = importlib.util.spec_from_file_location("_sem", Path(__file__).with_name("test_semantic.py"))
    sem = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sem)
    db = _two_unit_db(tmp_path / "u.db")
    u0 = UnitRef("mlp", 0, 0)
    did = db.put_description(Description(u0, "cities", "baseline", scores={"simulation": 0.1}))
    emb = sem.HashEmbedder()
    embed_descriptions(tmp_path / "u.db", emb)
    assert semantic_search(db, "cities", emb, min_score=0.5) == []
    db.update_scores(did, {"simulation": 0.9})  # describe's scoring pass, after the vectors were cached
    assert [h.unit for h in semantic_search(db, "cities", emb, min_score=0.5)] == [u0]


def test_unit_keys_past_sqlites_integers_are_refused():
    for key in ("mlp/0/99999999999999999999", "sae:x/99999999999999999999/0", "mlp/-1/0"):
        with pytest.raises(ValueError):
            UnitRef.parse(key)
    assert UnitRef.parse("mlp/3/7") == UnitRef("mlp", 3, 7)


def test_cli_search_with_a_huge_layer_or_limit_is_one_sentence(tmp_path):
    from tests.helpers.cli_inprocess import run_cli

    _two_unit_db(tmp_path / "u.db").close()
    res = run_cli("search", "Paris", "--db", str(tmp_path / "u.db"), "--layer", "99999999999999999999")
    assert res.returncode == 2 and "--layer a layer number" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("search", "Paris", "--db", str(tmp_path / "u.db"), "--limit", "99999999999999999999", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["hits"] == []  # no description yet


# ------------------------------------------------------------------ serve: run folders


def test_run_folders_of_the_wrong_shape_or_hidden_are_not_served(tmp_path):
    from starlette.testclient import TestClient

    from mechscope.server import runs as runs_mod
    from mechscope.server.app import create_app

    root = tmp_path / "runs"
    (root / "e1").mkdir(parents=True)
    (root / "e1" / "eval.json").write_text('{"layers":' + "[" * 100000 + "]" * 100000 + "}")
    (root / "c1").mkdir()
    (root / "c1" / "circuit.json").write_text(json.dumps(
        {"nodes": [{"name": "m0", "type": "mlp", "layer": [0], "in_circuit": True, "score": 1.0}]}))
    (root / ".hidden").mkdir()
    (root / ".hidden" / "circuit.json").write_text(json.dumps(
        {"nodes": [{"name": "secret-node", "type": "head", "layer": 0, "in_circuit": True, "score": 1.0}]}))
    assert runs_mod.find_run(root, ".hidden") is None
    with TestClient(create_app(root, None), raise_server_exceptions=False) as client:
        for path in ("/", "/runs", "/api/runs"):
            assert client.get(path).status_code == 200, path
        r = client.get("/run/c1/nodes")
        assert r.status_code == 404 and "not a circuit file" in r.text
        for path in ("/run/.hidden", "/run/.hidden/nodes"):
            r = client.get(path)
            assert r.status_code == 404 and "secret-node" not in r.text, path


# ------------------------------------------------------------------ results that must not depend on the batch size


def test_sinks_are_judged_per_context_whatever_the_batch():
    from mechscope.activations.store import context_sinks, sink_positions

    g = torch.Generator().manual_seed(0)
    quiet = torch.rand(3, 10, generator=g) + 1.0
    loud = torch.rand(3, 10, generator=g) * 40 + 20  # another context's norms, far above the first's
    quiet[1, 4] = 25.0  # 25x its own context's median, not the batch's
    norms = [torch.cat([quiet, loud])]
    alone = torch.cat([sink_positions([n[i:i + 1] for n in norms], 10.0) for i in range(6)])
    assert torch.equal(sink_positions(norms, 10.0), alone)
    assert bool(alone[1, 4]) and int(alone.sum()) == 1
    assert torch.equal(context_sinks(norms, 10.0), torch.cat([context_sinks([n[i:i + 1] for n in norms], 10.0) for i in range(6)]))


def test_dashboard_top_contexts_do_not_depend_on_the_batch_size(tiny_gpt2):
    from mechscope.activations.store import pack_contexts
    from mechscope.features.transcoder_set import random_transcoders
    from mechscope.sae.config import DashboardConfig
    from mechscope.sae.dashboard import feature_dashboards

    sae = random_transcoders(tiny_gpt2, 16).layers[1]
    text = " ".join(["the cat sat on the mat and the dog ran to the park"] * 20)
    ctx = list(pack_contexts(tiny_gpt2.tokenizer, [text] * 4, 12))[:6]
    toks = torch.tensor(ctx + ctx)  # every context twice: exact ties between contexts
    runs = [[(f.feature, [json.dumps(t, sort_keys=True) for t in f.top]) for f in
             feature_dashboards(tiny_gpt2, sae, DashboardConfig(ctx_len=12, batch_size=bs, n_top=4, n_samples=2,
                                                                features=list(range(16))), tokens=toks).features]
            for bs in (12, 5, 1)]
    assert runs[0] == runs[1] == runs[2]


def test_circuit_methods_refuse_a_half_precision_model_in_one_sentence(tiny_gpt2_dir, tmp_path):
    from mechscope import get_task
    from mechscope.circuits import DiscoverConfig, discover, edge_scores
    from mechscope.graph import build_graph
    from mechscope.models import load_model

    m = load_model(tiny_gpt2_dir, device="cpu", dtype="bfloat16")
    pairs = [{"clean": f"{a} gave a drink to", "corrupt": f"{b} gave a drink to", "answer": f" {b}", "wrong": f" {a}"}
             for a, b in (("John", "Mary"), ("Bob", "Alice"), ("Tom", "Anna"), ("Sam", "Kate"))]
    task = tmp_path / "t.jsonl"
    task.write_text("\n".join(map(json.dumps, pairs)))
    batch = get_task(str(task)).build(m.tokenizer)
    for call in (lambda: edge_scores(m, build_graph(m), batch, "eap-ig", steps=2),
                 lambda: discover(m, DiscoverConfig(task=str(task), method="acdc", n=4))):
        with pytest.raises(MechscopeError, match="loaded in bfloat16; load it with") as err:
            call()
        assert _one_sentence(str(err.value))


def test_the_vision_eap_note_is_in_the_saved_result():
    from mechscope.vision.eap import VisionEAPResult

    kw = dict(classes=("a", "b"), method="eap", steps=1, graph=None, scores=torch.zeros(1), circuit=torch.zeros(1),
              curve=[], chosen={}, accuracy={})
    short = VisionEAPResult(n_pairs={"fit": 12, "held_out": 7}, n_asked=12, **kw)  # type: ignore[arg-type]
    assert short.note and "7 held-out" in short.note and "12 scoring" not in short.note
    assert VisionEAPResult(n_pairs={"fit": 12, "held_out": 12}, n_asked=12, **kw).note is None  # type: ignore[arg-type]


# ------------------------------------------------------------------ resume: a run never continues with other inputs


def _twin(model_dir: str, root: Path) -> str:
    """The same model folder name holding other weights (a retrained model saved in another place)."""
    import shutil

    from safetensors.torch import load_file, save_file

    twin = root / Path(model_dir).name
    shutil.copytree(model_dir, twin)
    t = load_file(str(twin / "model.safetensors"))
    save_file({k: (v + 0.01 if v.dim() > 1 else v).contiguous() for k, v in t.items()}, str(twin / "model.safetensors"),
              metadata={"format": "pt"})
    return str(twin)


def test_tuned_lens_refuses_another_model_of_the_same_name(tiny_llama, tiny_llama_dir, corpus, tmp_path):
    from mechscope.lens import TunedLens, TunedLensTrainConfig
    from mechscope.lens.tuned import load_tuned_lens
    from mechscope.lens.tuned_train import train_tuned_lens
    from mechscope.models import load_model
    from mechscope.progress import Recorder

    other = load_model(_twin(tiny_llama_dir, tmp_path / "elsewhere"), device="cpu")
    assert other.summary.name == tiny_llama.summary.name and other.fingerprint() != tiny_llama.fingerprint()
    cfg = TunedLensTrainConfig(tokens=1500, context_len=32, kl_batch=32, kl_tokens=300, token_chunk=40, lr=3e-3,
                               matmul_dtype="float32", kl_steps=4, checkpoint_every=1)
    out = tmp_path / "tl"
    with pytest.raises(KeyboardInterrupt):
        train_tuned_lens(tiny_llama, corpus, cfg, out, progress=Recorder(interrupt_at={"KL fine-tune": 2}))
    with pytest.raises(MechscopeError, match="another model also called") as err:
        train_tuned_lens(other, corpus, cfg, out, resume=True)
    assert _one_sentence(str(err.value))
    lens = train_tuned_lens(tiny_llama, corpus, cfg, out, resume=True)
    lens.save(tmp_path / "saved")
    load_tuned_lens(tmp_path / "saved").check_fits(tiny_llama)
    with pytest.raises(MechscopeError, match="another model also called"):
        load_tuned_lens(tmp_path / "saved").check_fits(other)
    TunedLens.identity(other).check_fits(other)


def test_exemplars_checkpoint_refuses_units_whose_weights_changed(tmp_path):
    from mechscope.explain.config import ExemplarsConfig
    from mechscope.explain.exemplars import HarvestState

    cfg = ExemplarsConfig(units="sae:somewhere", n_tokens=64, context_len=8)
    HarvestState(cfg, {}, torch.zeros(0, 8, dtype=torch.int32), 0, 0, 0,
                 model={"fingerprint": "m", "unit_weights": {"0": "old"}}).save(tmp_path / "ck")
    assert HarvestState.load(tmp_path / "ck", cfg, "cpu", "m", {"0": "old"}) is not None
    with pytest.raises(MechscopeError, match="other weights of --units sae:somewhere") as err:
        HarvestState.load(tmp_path / "ck", cfg, "cpu", "m", {"0": "retrained"})
    assert _one_sentence(str(err.value))


def test_sae_training_refuses_to_resume_on_another_harvest(tiny_gpt2, corpus, tmp_path):
    from mechscope.activations import StoreConfig, get_corpus
    from mechscope.activations.shards import harvest
    from mechscope.sae import TrainConfig
    from mechscope.sae.train import sae_trainer

    hook = "blocks.0.hook_resid_post"
    for name, n in (("a", 3000), ("b", 4000)):  # one corpus, model and context length; other harvests
        harvest(tiny_gpt2, get_corpus(corpus, split="train"), StoreConfig(hooks=[hook], context_len=16), tmp_path / name, n,
                shard_tokens=1000, corpus_spec=corpus, progress=False)
    cfg = TrainConfig(k=4, expansion=2, tokens=2400, batch_tokens=200, checkpoint_every=400)
    sae_trainer(tiny_gpt2, hook, cfg, tmp_path / "sae", shards=tmp_path / "a").run(stop_after_steps=9)
    with pytest.raises(MechscopeError, match="other activation shards") as err:
        sae_trainer(tiny_gpt2, hook, cfg, tmp_path / "sae", shards=tmp_path / "b").run(resume=True)
    assert _one_sentence(str(err.value))
    sae_trainer(tiny_gpt2, hook, cfg, tmp_path / "sae", shards=tmp_path / "a").run(resume=True)


def test_a_damaged_shard_is_harvested_again(tiny_gpt2, corpus, tmp_path):
    from mechscope.activations import ShardStore, StoreConfig, get_corpus
    from mechscope.activations.shards import harvest

    hook = "blocks.0.hook_resid_post"

    def run():
        return harvest(tiny_gpt2, get_corpus(corpus, split="train"), StoreConfig(hooks=[hook], context_len=16),
                       tmp_path / "h", 3000, shard_tokens=1000, corpus_spec=corpus, progress=False)

    run()
    shard = tmp_path / "h" / json.loads((tmp_path / "h" / "manifest.json").read_text())["shards"][1]["file"]
    whole = shard.read_bytes()
    shard.write_bytes(whole[: len(whole) // 2])  # a copy cut short
    with pytest.raises(MechscopeError, match=f"activation shard {shard} is damaged"):
        store = ShardStore(tmp_path / "h", hooks=[hook])
        for _ in range(10):
            store.next_batch(500)
    run()
    assert shard.read_bytes() == whole  # written again, the same rows


def test_transcoder_checkpoint_with_damaged_json_is_one_sentence(tmp_path):
    from mechscope.features.train import _Run

    root = tmp_path / "checkpoint"
    root.mkdir()
    run = _Run.__new__(_Run)
    run.out = tmp_path
    for latest, state in (('{"generation": "gen_1', None), ('{"generation": "gen_1"}', "{}"), ('{"generation": "gen_1"}', '{"settings"')):
        (root / "latest.json").write_text(latest)
        if state is not None:
            (root / "gen_1").mkdir(exist_ok=True)
            (root / "gen_1" / "set.json").write_text(state)
        with pytest.raises(MechscopeError, match="is damaged") as err:
            run.load_checkpoint()
        assert _one_sentence(str(err.value))


def test_toy_training_refuses_a_folder_of_checkpoints_without_its_run_log(tmp_path):
    from mechscope.heads.train import resume_run

    out = tmp_path / "toy"
    (out / "ckpt_000004").mkdir(parents=True)
    with pytest.raises(MechscopeError, match="holds checkpoints of an earlier run but no train.json"):
        resume_run(out, {}, None, None, None, {})  # type: ignore[arg-type]
    assert resume_run(tmp_path / "fresh", {}, None, None, None, {"a": 1}) == (0, {"a": 1}, False)  # type: ignore[arg-type]
