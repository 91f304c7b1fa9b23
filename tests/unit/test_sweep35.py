"""Session 35's new-user sweep: each test is a defect a helper found by trying the tool as a user
would (tiny models built by hand, bad and unusual input), fixed in this session."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from mechscope.errors import MechscopeError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
from cli_inprocess import run_cli  # noqa: E402

# -- settings refused in one sentence, not a traceback deep in training -------------------------

@pytest.mark.parametrize("batch", [0, -1])
def test_toy_run_refuses_a_batch_below_one(batch):
    from mechscope.heads.config import ToyConfig

    with pytest.raises(MechscopeError, match="--batch must be at least 1"):
        ToyConfig(batch=batch)


@pytest.mark.parametrize("field", ["n", "seq_len", "n_eval"])
def test_dynamics_refuses_counts_below_one(field):
    from mechscope.heads.config import DynamicsConfig

    with pytest.raises(MechscopeError, match="must be at least 1"):
        DynamicsConfig(**{field: 0})
    with pytest.raises(MechscopeError, match="must be an integer"):
        DynamicsConfig(**{field: "3"})


def test_cli_train_toy_batch_zero_is_one_sentence_and_leaves_nothing(tmp_path):
    r = run_cli("--quiet", "train-toy", "--d-model", "32", "--steps", "2", "--batch", "0", "--out", str(tmp_path / "t"), "--json")
    assert r.returncode == 2 and json.loads(r.stdout) == {"error": "--batch must be at least 1; got 0.", "exit_code": 2}
    assert "Traceback" not in r.stderr and not (tmp_path / "t").exists()


def test_check_early_names_the_wrong_option_not_a_limit_of_a_two_token_context():
    """Where no context length lifts a refusal, it comes in the default length's words: the
    shortest length's first failing check was a limit of 2-token contexts (k against a batch),
    not the option that is wrong."""
    from mechscope.cli.common import check_early

    def make(n: int) -> None:
        if 8 * n < 2 * 20:
            raise MechscopeError(f"k=20 is more than half a batch's tokens ({8 * n})")
        raise MechscopeError("--sink-ratio must be above 1")

    with pytest.raises(MechscopeError, match="sink-ratio"):
        check_early(make, None, 64)
    lifted = []
    check_early(lambda n: lifted.append(n) if n <= 10 else (_ for _ in ()).throw(MechscopeError("too long")), None, 64)
    assert lifted == [2]  # a shorter length lifts it: the refusal waits for the model's own length


# -- the same corpus under another spelling resumes ---------------------------------------------

def test_same_corpus_accepts_spellings_of_one_path(tmp_path, monkeypatch):
    from mechscope.activations.corpus import same_corpus

    (tmp_path / "c.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n')
    monkeypatch.chdir(tmp_path)
    assert same_corpus("c.jsonl", str(tmp_path / "c.jsonl")) and same_corpus("./c.jsonl", "c.jsonl")
    assert not same_corpus("c.jsonl", "d.jsonl")  # same text, another file: not the same corpus
    assert same_corpus(None, None) and not same_corpus(None, "c.jsonl") and not same_corpus("pydoc", "c.jsonl")
    assert not same_corpus("missing.jsonl", str(tmp_path / "missing.jsonl"))  # nothing to resolve: strings decide


def test_resume_takes_the_corpus_by_another_path(tiny_gpt2_dir, corpus, tmp_path, monkeypatch):
    """A tuned lens trained with a relative --corpus extends with the absolute path (the settings
    check compared the strings); another corpus is still refused."""
    import shutil

    monkeypatch.chdir(tmp_path)
    name = "c" + Path(corpus).suffix
    shutil.copy(corpus, tmp_path / name)
    shutil.copy(corpus, tmp_path / ("d" + Path(corpus).suffix))
    train = ["--quiet", "tuned-lens", "train", "--model", tiny_gpt2_dir, "--tokens", "512", "--kl-batch", "16",
             "--checkpoint-every", "5", "--device", "cpu", "--out", "tl"]
    assert run_cli(*train, "--kl-steps", "5", "--corpus", name).returncode == 0
    other = run_cli(*train, "--kl-steps", "10", "--resume", "--corpus", "d" + Path(corpus).suffix)
    assert other.returncode == 2 and "was made with corpus" in other.stderr, other.stderr
    again = run_cli(*train, "--kl-steps", "10", "--resume", "--corpus", str(tmp_path / name))
    assert again.returncode == 0, again.stderr


# -- a training command never replaces what it trained; its lens's evaluation does not block it ---

def test_vision_train_refuses_to_replace_a_trained_model(tmp_path):
    out = tmp_path / "m"
    first = run_cli("--quiet", "vision", "train", "--arch", "cnn", "--epochs", "1", "--out", str(out))
    assert first.returncode == 0, first.stderr
    before = (out / "model.safetensors").read_bytes()
    again = run_cli("--quiet", "vision", "train", "--arch", "vit", "--epochs", "1", "--out", str(out))
    assert again.returncode == 2 and "already holds a trained vision model" in again.stderr, again.stderr
    assert (out / "model.safetensors").read_bytes() == before and "cnn" in (out / "config.json").read_text()


def test_tuned_lens_extends_after_its_own_evaluation(tiny_gpt2_dir, corpus, tmp_path):
    out = tmp_path / "tl"
    train = ["--quiet", "tuned-lens", "train", "--model", tiny_gpt2_dir, "--corpus", corpus, "--tokens", "512",
             "--kl-batch", "16", "--checkpoint-every", "5", "--device", "cpu", "--out", str(out)]
    assert run_cli(*train, "--kl-steps", "5").returncode == 0
    ev = run_cli("--quiet", "tuned-lens", "eval", str(out), "--model", tiny_gpt2_dir, "--corpus", corpus, "--tokens", "64",
                 "--device", "cpu")
    assert ev.returncode == 0 and (out / "eval.json").is_file(), ev.stderr
    refused = run_cli(*train, "--kl-steps", "5")  # without --resume a finished lens is still never replaced
    assert refused.returncode == 2 and "already holds a tuned lens" in refused.stderr and (out / "eval.json").is_file()
    ext = run_cli(*train, "--kl-steps", "10", "--resume")
    assert ext.returncode == 0, ext.stderr
    assert not (out / "eval.json").exists() and not (out / "eval.html").exists()  # it described the lens before
    assert "removed eval.json" in " ".join(ext.stderr.split())
    assert json.loads((out / "tuned_lens.json").read_text())["training"]["kl_log"][-1]["step"] == 10


def test_an_sae_evaluation_folder_is_still_refused_to_a_tuned_lens(tiny_gpt2_dir, corpus, tmp_path):
    """Only a lens's own evaluation is welcome: a folder holding just an evaluation is another result."""
    out = tmp_path / "ev"
    out.mkdir()
    (out / "eval.json").write_text('{"layers": []}')
    r = run_cli("--quiet", "tuned-lens", "train", "--model", tiny_gpt2_dir, "--corpus", corpus, "--tokens", "512",
                "--kl-steps", "2", "--device", "cpu", "--out", str(out))
    assert r.returncode == 2 and "holds an evaluation" in r.stderr and (out / "eval.json").is_file()


# -- options an architecture does not read are refused, not ignored ------------------------------

@pytest.mark.parametrize("args, option", [
    (["sae", "train", "--hook", "blocks.0.hook_resid_post", "--arch", "jumprelu", "--k", "8"], "--k"),
    (["sae", "train", "--hook", "blocks.0.hook_resid_post", "--arch", "topk", "--l1", "3"], "--l1"),
    (["sae", "train", "--hook", "blocks.0.hook_resid_post", "--arch", "relu", "--l0", "3"], "--l0"),
    (["transcoders", "train", "--arch", "relu", "--k", "10000"], "--k"),
    (["transcoders", "train", "--arch", "jumprelu", "--no-skip", "--k", "4"], "--k"),
])
def test_sparsity_options_the_architecture_does_not_read_are_refused(args, option, tmp_path):
    r = run_cli("--quiet", *args, "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and f"{option} applies to --arch" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_sparsity_options_the_architecture_reads_pass_the_check(tmp_path):
    for args in (["sae", "train", "--hook", "blocks.0.hook_resid_post", "--arch", "relu", "--l1", "3"],
                 ["transcoders", "train", "--arch", "batchtopk", "--k", "8"]):
        r = run_cli("--quiet", *args, "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "o"))
        assert r.returncode == 2 and "applies to --arch" not in r.stderr  # refused later: the model is missing


# -- databases and graphs ------------------------------------------------------------------------

def test_describe_leaves_an_empty_file_untouched(tmp_path):
    db = tmp_path / "z.db"
    db.write_bytes(b"")
    r = run_cli("--quiet", "describe", "--db", str(db), "--scorer", "none")
    assert r.returncode == 2 and "is empty, not a mechscope unit database" in r.stderr
    assert db.stat().st_size == 0 and not Path(f"{db}-wal").exists()


def _sae(tmp_path: Path, name: str, seed: int) -> Path:
    from mechscope.models.hooks import resid_post
    from mechscope.sae.io import save_sae
    from mechscope.sae.model import SAE, SAEConfig

    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=64, d_sae=16, architecture="relu", hook_name=resid_post(1), model_name="tiny"))
    with torch.no_grad():
        sae.W_enc.normal_()
        sae.W_dec.normal_()
    save_sae(sae, tmp_path / name)
    return tmp_path / name


def test_two_saes_of_one_folder_name_do_not_mix_in_a_database(tiny_llama, tmp_path):
    """The database names an SAE by its folder's name; a second SAE in a folder of that name (other
    weights) is refused before its pass, and the first one's units are left as they were."""
    from mechscope.explain.config import ExemplarsConfig
    from mechscope.explain.db import UnitDB
    from mechscope.explain.exemplars import harvest_exemplars

    a = _sae(tmp_path / "a", "sae_x", seed=1)
    b = _sae(tmp_path / "b", "sae_x", seed=2)
    g = torch.Generator().manual_seed(0)
    ctxs = torch.randint(1, 512, (8, 16), generator=g).tolist()

    def cfg(folder: Path) -> ExemplarsConfig:
        return ExemplarsConfig(units=f"sae:{folder}", n_tokens=8 * 16, context_len=16, batch_size=8, k=3, k_bottom=2,
                               before=3, after=2, per_quantile=1, n_random=2, n_bins=8, checkpoint_every=0)

    db = UnitDB(tmp_path / "u.db", model_id="tiny", fingerprint=tiny_llama.fingerprint())
    harvest_exemplars(tiny_llama, cfg(a), db=db, contexts=ctxs)
    ref = db.units("sae", source="sae_x")[0]
    before = db.unit(ref)
    harvest_exemplars(tiny_llama, cfg(a), db=db, contexts=ctxs)  # the same SAE again: fine
    with pytest.raises(MechscopeError, match="other weights"):
        harvest_exemplars(tiny_llama, cfg(b), db=db, contexts=ctxs)
    assert db.unit(ref).max_act == before.max_act


def test_exemplars_of_transcoders_trained_on_other_weights_are_refused(tiny_gpt2, tset_dir, tmp_path):
    import shutil

    from mechscope.explain.units import TranscoderFeatures

    TranscoderFeatures(tiny_gpt2, tset_dir)  # recorded for no model: accepted
    other = tmp_path / "set"
    shutil.copytree(tset_dir, other)
    for cfg_file in other.glob("layer_*/cfg.json"):
        c = json.loads(cfg_file.read_text())
        c.setdefault("metadata", {})["model_fingerprint"] = "v1:0000000000000000"
        cfg_file.write_text(json.dumps(c))
    with pytest.raises(MechscopeError, match="whose weights differ"):
        TranscoderFeatures(tiny_gpt2, other)


def test_attribute_refuses_a_target_given_twice(tiny_gpt2, tset_dir):
    from mechscope.features.attribute import attribute
    from mechscope.features.transcoder_set import load_transcoders

    tset = load_transcoders(tset_dir, model=tiny_gpt2)
    ids = tiny_gpt2.to_tokens("When Mary and John went to the store")
    with pytest.raises(MechscopeError, match="given twice"):
        attribute(tiny_gpt2, tset, ids, targets=[5, 7, 5], max_features=4)
    g = attribute(tiny_gpt2, tset, ids, targets=[5, 7], max_features=4)
    assert g.logit_tokens.tolist() == [5, 7]


# -- circuit selection options are applied or refused, never dropped ------------------------------

def test_edges_and_threshold_together_are_refused_except_for_acdc():
    from mechscope.circuits.config import DiscoverConfig

    with pytest.raises(MechscopeError, match="--edges and --threshold each choose the circuit"):
        DiscoverConfig(method="eap", edges=5, threshold=0.1)
    DiscoverConfig(method="acdc", edges=5, threshold=0.1)  # ACDC's threshold is its tau: both apply


@pytest.mark.slow
def test_node_level_threshold_selects_nodes_by_score(tiny_llama, tmp_path):
    """At node level --threshold kept every node and the result said "threshold"; now it keeps
    the nodes whose score reaches it: none above the largest score, all at -inf."""
    from mechscope.circuits import DiscoverConfig, discover
    from mechscope.circuits.attribution import node_scores
    from mechscope.circuits.reference import compare_with_reference
    from mechscope.circuits.result import CircuitResult
    from mechscope.circuits.select import importance
    from mechscope.cli.circuits import reference_lines

    def run(tau: float) -> CircuitResult:
        return discover(tiny_llama, DiscoverConfig(task="induction", n=12, method="eap", level="node", threshold=tau,
                                                   labels=False, force=True, bootstrap=20), progress=False)

    everything = run(-1e30)
    g = everything.graph
    assert torch.equal(everything.circuit.bool(), g.allowed.bool())
    ns = node_scores(g, importance(everything.scores, "eap", "signed")).cpu()  # what selection ranks by
    tau = float(ns[1:].median())
    some = run(tau)
    kept_nodes = some.circuit.bool().any(1)  # every node has an edge to the logits
    assert 1 < int(kept_nodes.sum()) < g.n_senders  # some nodes, not all
    assert torch.equal(kept_nodes[1:], ns[1:] >= tau)
    assert not bool(run(1e30).circuit.bool()[1:].any())  # only the input's edges are left
    assert some.metrics.get("selection", "threshold") == "threshold"

    # a circuit compared with itself: the node AUC is undefined where it holds every node, and said so
    everything.save(tmp_path / "all")
    r = compare_with_reference(everything, tmp_path / "all")
    assert r["node_roc_auc"] != r["node_roc_auc"]  # NaN
    assert "undefined" in reference_lines(r, "signed")[0]
    # another model's run: compared, with a note
    doc = json.loads((tmp_path / "all" / "circuit.json").read_text())
    doc["model"] = {**doc["model"], "name": "another-model"} if isinstance(doc["model"], dict) else "another-model"
    (tmp_path / "all" / "circuit.json").write_text(json.dumps(doc))
    r = compare_with_reference(everything, tmp_path / "all")
    assert "found on another-model" in r["note"] and any(line.startswith("note: ") for line in reference_lines(r, "signed"))


def test_a_task_refuses_more_pairs_than_it_can_hold(tiny_gpt2):
    from mechscope.tasks import MAX_PAIRS, get_task

    with pytest.raises(MechscopeError, match="more pairs than a task builds"):
        get_task("induction").build(tiny_gpt2.tokenizer, n=MAX_PAIRS + 1)
    assert len(get_task("induction").build(tiny_gpt2.tokenizer, n=3).clean) == 3


def test_a_circuit_found_on_callers_pairs_is_not_evaluated_on_cfg_tasks_pairs(tiny_llama, tmp_path):
    """discover(batch=...) saved settings.task = cfg.task ('ioi' by default), so evaluate_saved drew
    that task's pairs for a circuit found on others; now the settings name the batch's task and
    evaluation asks which task to use."""
    from mechscope.circuits import DiscoverConfig, discover, evaluate_saved
    from mechscope.tasks import get_task

    batch = get_task("induction").build(tiny_llama.tokenizer, n=12, seed=3)
    res = discover(tiny_llama, DiscoverConfig(task="ioi", n=12, method="eap", edges=20, labels=False, force=True,
                                              bootstrap=20), batch=batch, progress=False)
    assert res.task == res.settings["task"] == batch.task and res.settings["pairs_from_caller"] is True
    res.save(tmp_path / "run")
    with pytest.raises(MechscopeError, match="passed to discover"):
        evaluate_saved(tiny_llama, tmp_path / "run")
    out = evaluate_saved(tiny_llama, tmp_path / "run", task="induction", n=12)
    assert out["edges_kept"] == int(res.circuit.sum())
