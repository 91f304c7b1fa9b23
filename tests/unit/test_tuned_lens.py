"""The tuned lens on tiny random models: the zero translator is the logit lens, the closed form
equals an independent least-squares solve, the translator reading the final residual is the
identity, training beats the logit lens on held-out text, files round-trip, translators of
another model are refused, resume equals an uninterrupted run, the tuned-lens package's
params.pt converts (and a pickle that would run code is refused)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mechscope.cli.main import app
from mechscope.errors import MechscopeError
from mechscope.lens import TunedLens, TunedLensTrainConfig, run_lens
from mechscope.lens.tuned import convert_tuned_lens, load_tuned_lens
from mechscope.lens.tuned_eval import evaluate_tuned_lens
from mechscope.lens.tuned_train import harvest_residuals, train_tuned_lens
from mechscope.models.hooks import FINAL_NORM_IN, resid_post, resid_pre
from mechscope.models.prompt import encode_prompt
from mechscope.models.unembed import final_norm, project
from mechscope.progress import Recorder

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
from tuned_lens_package import write_package  # noqa: E402

PROMPT = "When Mary and John went to the store, John gave a drink to"
SMALL = dict(tokens=2500, context_len=32, kl_batch=32, kl_tokens=600, token_chunk=40, lr=3e-3, matmul_dtype="float32",
             cache_dtype="float32", checkpoint_every=2)



@pytest.fixture(scope="module")
def trained(tiny_llama, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tl") / "lens"
    lens = train_tuned_lens(tiny_llama, corpus, TunedLensTrainConfig(**{**SMALL, "kl_steps": 30}), out)
    return lens, out


def test_zero_translators_are_the_logit_lens_exactly(tiny_model):
    plain = run_lens(tiny_model, PROMPT, k=3)
    for reads, rows in (("resid_post", slice(2, None, 3)), ("resid_pre", slice(0, None, 3))):
        tuned = run_lens(tiny_model, PROMPT, k=3, tuned=TunedLens.identity(tiny_model, reads))
        assert tuned.sites == plain.sites[rows]
        assert torch.equal(tuned.rank, plain.rank[rows]) and torch.equal(tuned.prob, plain.prob[rows])
        assert torch.equal(tuned.top_ids, plain.top_ids[rows])
        assert tuned.settings["logit_rank_last_position"] == plain.rank[rows, -1].tolist()
    h = torch.randn(5, tiny_model.summary.d_model)
    assert torch.equal(TunedLens.identity(tiny_model).logits(tiny_model, h, 0), project(tiny_model, h))


def test_layer_of_maps_residual_hooks_onto_translators(tiny_llama):
    L = tiny_llama.summary.n_layers
    post, pre = TunedLens.identity(tiny_llama, "resid_post"), TunedLens.identity(tiny_llama, "resid_pre")
    assert post.hooks == [resid_post(l) for l in range(L)] and pre.hooks == [resid_pre(l) for l in range(L)]
    assert [post.layer_of(resid_pre(l)) for l in range(1, L)] == list(range(L - 1))
    assert [pre.layer_of(resid_post(l)) for l in range(L - 1)] == list(range(1, L))
    assert pre.layer_of(resid_post(L - 1)) is None and pre.layer_of(FINAL_NORM_IN) is None
    with pytest.raises(MechscopeError, match="no translator"):
        post.layer_of(resid_pre(0))
    with pytest.raises(MechscopeError, match="not a residual stream"):
        post.layer_of("blocks.0.hook_mlp_out")


@pytest.mark.slow
def test_closed_form_equals_an_independent_least_squares_solve(tiny_llama, corpus):
    cfg = TunedLensTrainConfig(**{**SMALL, "kl_steps": 0, "ridge": 1e-3, "reads": "resid_pre"})
    lens = train_tuned_lens(tiny_llama, corpus, cfg)  # streamed over several forward batches
    norm = final_norm(tiny_llama)
    rows = {}
    for part, _ in harvest_residuals(tiny_llama, corpus, lens.hooks, cfg.tokens, "train", cfg.context_len, cfg.forward_contexts):
        for k, v in part.items():
            rows.setdefault(k, []).append(v)
    rows = {k: torch.cat(v).double() for k, v in rows.items()}
    assert rows[FINAL_NORM_IN].shape[0] == cfg.tokens
    y = rows[FINAL_NORM_IN]
    z = y / (y.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()
    for layer in (0, 2):  # the embeddings and a middle layer
        h = rows[resid_pre(layer)]
        r = (h.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()
        X = torch.cat([h / r, 1 / r], 1)  # [n, d + 1]
        d = X.shape[1] - 1
        lam = 1e-3 * float((h / r).pow(2).sum(0).mean())  # the ridge, relative to the Gram matrix's mean diagonal
        pen = torch.diag(torch.tensor([lam] * d + [lam * 1e-6], dtype=torch.float64)).sqrt()  # the bias almost free
        B = torch.linalg.lstsq(torch.cat([X, pen]), torch.cat([z - h / r, torch.zeros(d + 1, d, dtype=torch.float64)])).solution
        assert torch.allclose(lens.weight[layer].double(), B[:-1].T, atol=2e-3), (lens.weight[layer].double() - B[:-1].T).abs().max()
        assert torch.allclose(lens.bias[layer].double(), B[-1], atol=2e-3)
        # and the fit helps: the translated direction is closer to the final one than the raw state
        t = lens.translate(h.float(), layer).double()
        cos = lambda a: torch.nn.functional.cosine_similarity(a, y, dim=-1).mean()  # noqa: E731
        assert cos(t) > cos(h)


def test_translator_reading_the_final_residual_is_the_identity(trained):
    lens, _ = trained
    assert lens.reads == "resid_post"
    assert torch.equal(lens.weight[-1], torch.zeros_like(lens.weight[-1])) and torch.equal(lens.bias[-1], torch.zeros_like(lens.bias[-1]))
    assert lens.weight[0].abs().max() > 1e-3  # the others moved
    assert lens.info["training"]["kl_layers"] == list(range(lens.n_layers - 1))


def test_trained_lens_beats_the_logit_lens_on_heldout_text_at_every_layer(trained, tiny_llama, corpus):
    lens, _ = trained
    res = evaluate_tuned_lens(tiny_llama, lens, corpus, n_tokens=400, context_len=32)
    assert res["tokens"] == 400
    for r in res["layers"][:-1]:
        assert r["kl_tuned"] < r["kl_logit"], r
    last = res["layers"][-1]
    assert last["kl_logit"] == pytest.approx(0.0, abs=1e-6) and last["kl_tuned"] == pytest.approx(0.0, abs=1e-6)
    assert res["summary"]["tuned_below_logit_every_layer"]
    # the KL fine-tune lowered its training loss from where the closed form left it
    log = lens.info["training"]["kl_log"]
    assert sum(r["kl_mean"] for r in log[-5:]) < sum(r["kl_mean"] for r in log[:5])


def test_save_load_round_trip(trained, tiny_llama, tmp_path):
    lens, out = trained
    back = load_tuned_lens(out, tiny_llama)
    assert torch.equal(back.weight, lens.weight) and torch.equal(back.bias, lens.bias)
    assert back.reads == lens.reads and back.hooks == lens.hooks and back.model_info == lens.model_info
    assert back.info["settings"] == lens.info["settings"]
    h = torch.randn(4, lens.d_model)
    assert torch.equal(back.logits(tiny_llama, h, 1), lens.logits(tiny_llama, h, 1))
    d = json.loads((out / "tuned_lens.json").read_text())
    assert d["schema_version"] == 1 and d["reads"] == "resid_post" and d["model"]["n_layers"] == tiny_llama.summary.n_layers
    assert (out / "checkpoint" / "state.safetensors").is_file() and not list(out.rglob("*.pt"))  # kept to extend the run


def test_translators_of_another_model_are_refused_in_one_sentence(trained, tiny_gpt2, tiny_gpt2_dir):
    _, out = trained
    with pytest.raises(MechscopeError) as e:
        load_tuned_lens(out, tiny_gpt2)
    assert "not" in str(e.value) and str(e.value).count(". ") == 0 and "\n" not in str(e.value)
    r = CliRunner().invoke(app, ["lens", PROMPT, "--tuned", str(out), "--model", tiny_gpt2_dir, "--device", "cpu"])
    assert r.exit_code == 2 and r.stderr.rsplit("error: ", 1)[1].startswith("these translators")
    assert r.stderr.rsplit("error: ", 1)[1].count("\n") == 1
    r = CliRunner().invoke(app, ["lens", PROMPT, "--tuned", str(out / "nowhere")])
    assert r.exit_code == 2 and "No tuned lens" in r.stderr


def test_resume_ends_where_an_uninterrupted_run_ends(tiny_llama, corpus, tmp_path):
    cfg = TunedLensTrainConfig(**{**SMALL, "kl_steps": 7})
    straight = train_tuned_lens(tiny_llama, corpus, cfg, tmp_path / "straight")

    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        train_tuned_lens(tiny_llama, corpus, cfg, out, progress=Recorder(interrupt_at={"KL fine-tune": 5}))
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 4
    with pytest.raises(MechscopeError, match="add --resume"):
        train_tuned_lens(tiny_llama, corpus, cfg, out)
    with pytest.raises(MechscopeError, match="lr=0.003, not 0.01"):
        train_tuned_lens(tiny_llama, corpus, TunedLensTrainConfig(**{**SMALL, "kl_steps": 7, "lr": 1e-2}), out, resume=True)
    resumed = train_tuned_lens(tiny_llama, corpus, cfg, out, resume=True)
    assert torch.equal(resumed.weight, straight.weight) and torch.equal(resumed.bias, straight.bias)
    assert resumed.info["training"]["kl_log"] == straight.info["training"]["kl_log"]
    # the finished run keeps its checkpoint: a fresh run into it is refused, resuming it is a no-op
    with pytest.raises(MechscopeError, match="larger --kl-steps to extend it"):
        train_tuned_lens(tiny_llama, corpus, cfg, out)
    again = train_tuned_lens(tiny_llama, corpus, cfg, out, resume=True)
    assert torch.equal(again.weight, straight.weight) and again.info["training"]["kl_log"] == straight.info["training"]["kl_log"]
    with pytest.raises(MechscopeError, match="beyond --kl-steps 5"):
        train_tuned_lens(tiny_llama, corpus, TunedLensTrainConfig(**{**SMALL, "kl_steps": 5}), out, resume=True)


def test_a_finished_run_extends_to_exactly_a_longer_run(tiny_llama, corpus, tmp_path):
    long = train_tuned_lens(tiny_llama, corpus, TunedLensTrainConfig(**{**SMALL, "kl_steps": 9}), tmp_path / "long")
    out = tmp_path / "short"
    train_tuned_lens(tiny_llama, corpus, TunedLensTrainConfig(**{**SMALL, "kl_steps": 4}), out)
    extended = train_tuned_lens(tiny_llama, corpus, TunedLensTrainConfig(**{**SMALL, "kl_steps": 9}), out, resume=True)
    assert torch.equal(extended.weight, long.weight) and torch.equal(extended.bias, long.bias)
    assert extended.info["training"]["kl_log"] == long.info["training"]["kl_log"]
    assert torch.equal(load_tuned_lens(out, tiny_llama).weight, long.weight)

    dropped = tmp_path / "dropped"
    train_tuned_lens(tiny_llama, corpus, TunedLensTrainConfig(**{**SMALL, "kl_steps": 4, "keep_checkpoint": False}), dropped)
    assert not (dropped / "checkpoint").exists()
    with pytest.raises(MechscopeError, match="without its checkpoint"):
        train_tuned_lens(tiny_llama, corpus, TunedLensTrainConfig(**{**SMALL, "kl_steps": 9}), dropped, resume=True)


class _Evil:
    def __reduce__(self):
        return (print, ("this ran",))


def test_tuned_lens_package_params_convert_and_load(tiny_llama, tmp_path, capsys):
    L, D = tiny_llama.summary.n_layers, tiny_llama.summary.d_model
    state = write_package(tmp_path / "pkg", L, D, f"someone/{tiny_llama.summary.name}")
    r = CliRunner().invoke(app, ["tuned-lens", "convert", str(tmp_path / "pkg" / "params.pt"), "--out", str(tmp_path / "conv"), "--json"])
    assert r.exit_code == 0, r.output
    lens = load_tuned_lens(tmp_path / "conv", tiny_llama)
    assert lens.reads == "resid_pre" and lens.hooks[0] == resid_pre(0)
    assert all(torch.equal(lens.weight[i], state[f"{i}.weight"]) and torch.equal(lens.bias[i], state[f"{i}.bias"]) for i in range(L))
    # the package's own layout with the pickle converted to safetensors loads directly
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "pkg" / "params.safetensors"))
    direct = load_tuned_lens(tmp_path / "pkg", tiny_llama)
    assert torch.equal(direct.weight, lens.weight) and direct.reads == "resid_pre"
    # the package semantics: logits of hidden_states[i] are unembed(h + Linear_i(h))
    h = torch.randn(3, D)
    lin = torch.nn.Linear(D, D)
    lin.load_state_dict({"weight": state["1.weight"], "bias": state["1.bias"]})
    with torch.no_grad():
        assert torch.allclose(lens.logits(tiny_llama, h, 1), project(tiny_llama, h + lin(h)), atol=1e-5)
    # a pickle that would run code is refused by weights_only, and nothing runs
    torch.save({"0.weight": _Evil()}, tmp_path / "pkg" / "evil.pt")
    with pytest.raises(MechscopeError, match="weights_only=True") as e:
        convert_tuned_lens(tmp_path / "pkg" / "evil.pt", tmp_path / "evil", tmp_path / "pkg" / "config.json")
    assert "this ran" not in capsys.readouterr().out
    assert "weights_only` set to `False`" not in str(e.value) and "could run code" in str(e.value)  # not torch's advice to unpickle it
    # a pickle folder without conversion: the error says how
    (tmp_path / "pkg" / "params.safetensors").unlink()
    with pytest.raises(MechscopeError, match="tuned-lens convert"):
        TunedLens.load(tmp_path / "pkg")


def test_cli_train_eval_and_lens_with_tuned(tiny_llama_dir, corpus, tmp_path):
    runner = CliRunner()
    out = tmp_path / "tl"
    r = runner.invoke(app, ["tuned-lens", "train", "--out", str(out), "--tokens", "1500", "--kl-steps", "3", "--kl-batch", "16",
                            "--kl-tokens", "200", "--matmul-dtype", "float32", "--corpus", corpus, "--model", tiny_llama_dir,
                            "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["n_layers"] == 3
    r = runner.invoke(app, ["tuned-lens", "eval", str(out), "--tokens", "120", "--corpus", corpus, "--model", tiny_llama_dir,
                            "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert len(d["layers"]) == 3 and (out / "eval.json").is_file()
    html = (out / "eval.html").read_text()
    assert "tuned lens" in html and "<svg" in html
    r = runner.invoke(app, ["lens", PROMPT, "--tuned", str(out), "--model", tiny_llama_dir, "--device", "cpu",
                            "--out", str(tmp_path / "lens"), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["settings"]["lens"] == "tuned" and d["lens"]["sites"] == ["L0.post", "L1.post", "L2.post"]
    assert "Tuned lens" in (tmp_path / "lens" / "report.html").read_text()
    for bad, msg in ((["tuned-lens", "train", "--out", str(tmp_path / "x"), "--kl-tokens", "10", "--tokens", "5"], "exceeds"),
                     (["tuned-lens", "train", "--out", str(tmp_path / "x"), "--reads", "mlp_out"], "not a translator input"),
                     (["tuned-lens", "eval", str(tmp_path / "nothing")], "No tuned lens"),
                     (["tuned-lens", "convert", str(tmp_path / "no.pt"), "--out", str(tmp_path / "y")], "No file")):
        r = runner.invoke(app, bad)
        assert r.exit_code == 2 and msg in r.stderr and r.stderr.rsplit("error: ", 1)[1].count("\n") == 1, (bad, r.output)


def test_recall_refuses_bad_tuned_lens_input(trained, tiny_gpt2_dir, tmp_path):
    _, out = trained
    runner = CliRunner()
    for args, msg in (([], "not both"), (["--model", tiny_gpt2_dir, "--device", "cpu"], "these translators")):
        r = runner.invoke(app, ["recall", PROMPT, "--subject", "Mary", "--tuned", str(out), *args,
                                *(["--logit-lens"] if msg == "not both" else []), "--out", str(tmp_path / "r")])
        assert r.exit_code == 2 and r.stderr.rsplit("error: ", 1)[1].count("\n") == 1 and msg in r.stderr, r.output


def test_subject_enrichment_reads_through_the_tuned_lens(tiny_llama, trained):
    from mechscope.recall.enrichment import subject_projections

    tokens = encode_prompt(tiny_llama, PROMPT)
    plain = subject_projections(tiny_llama, tokens, 3, top_k=5)
    assert subject_projections(tiny_llama, tokens, 3, top_k=5, tuned=TunedLens.identity(tiny_llama)) == plain
    lens, _ = trained
    tuned = subject_projections(tiny_llama, tokens, 3, top_k=5, tuned=lens)
    assert tuned[-1] == plain[-1] and tuned[:-1] != plain[:-1]


def test_auto_matmul_dtype_is_bfloat16_only_where_the_hardware_has_it(monkeypatch, tiny_llama, corpus, tmp_path):
    from mechscope.lens import tuned_train

    monkeypatch.setattr(tuned_train, "_cpu_has_bf16", lambda: False)
    assert tuned_train.resolve_matmul_dtype("auto", "cpu") == "float32"
    assert tuned_train.resolve_matmul_dtype("auto", "cuda") == "bfloat16"
    assert tuned_train.resolve_matmul_dtype("bfloat16", "cpu") == "bfloat16"
    monkeypatch.setattr(tuned_train, "_cpu_has_bf16", lambda: True)
    assert tuned_train.resolve_matmul_dtype("auto", "cpu") == "bfloat16"
    monkeypatch.setattr(tuned_train, "_cpu_has_bf16", lambda: False)
    cfg = TunedLensTrainConfig(**{**SMALL, "matmul_dtype": "auto", "kl_steps": 2})
    lens = train_tuned_lens(tiny_llama, corpus, cfg, tmp_path / "auto")
    assert lens.info["settings"]["matmul_dtype"] == "float32"  # the dtype that ran, not "auto"
    # resuming with auto keeps the dtype the checkpoint ran with, whatever this hardware would pick
    bf = TunedLensTrainConfig(**{**SMALL, "matmul_dtype": "bfloat16", "kl_steps": 2})
    train_tuned_lens(tiny_llama, corpus, bf, tmp_path / "bf16")
    more = train_tuned_lens(tiny_llama, corpus, TunedLensTrainConfig(**{**SMALL, "matmul_dtype": "auto", "kl_steps": 3}),
                            tmp_path / "bf16", resume=True)
    assert more.info["settings"]["matmul_dtype"] == "bfloat16" and len(more.info["training"]["kl_log"]) == 3
    with pytest.raises(MechscopeError, match="matmul_dtype must be auto, bfloat16 or float32"):
        TunedLensTrainConfig(matmul_dtype="float16")
