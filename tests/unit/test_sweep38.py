"""Defects found by session 38's sweeps, each fixed and tested here (every test fails on the
code before the fix). Report pages: what a page shows must agree with the JSON it was made from.
Command line: an option the run would not read is refused in one sentence, never accepted and
recorded as if it had been used."""

from __future__ import annotations

import json
import math
import re
from html.parser import HTMLParser

import pytest

from mechscope.errors import MechscopeError
from mechscope.report.toolkit import fmt, pct


def _text(page: str) -> str:
    """The visible text of a page (scripts and styles left out)."""
    out: list[str] = []

    class P(HTMLParser):
        skip = 0

        def handle_starttag(self, tag, attrs):
            self.skip += tag in ("style", "script")

        def handle_endtag(self, tag):
            self.skip -= tag in ("style", "script")

        def handle_data(self, data):
            if not self.skip:
                out.append(data)

    P().feed(page)
    return " ".join(" ".join(out).split())


def test_a_circuit_of_every_edge_reads_100_percent_not_1e2():
    from test_report import synthetic_circuit

    from mechscope.report.circuit import render_circuit

    d = synthetic_circuit()
    d["metrics"].update(n_edges_kept=110, n_edges=110)
    assert "edges kept 110 100% of 110" in _text(render_circuit(d))
    assert pct(1.0) == "100%" and pct(0.995) == "99.5%"


def test_small_densities_are_percentages_with_their_sign():
    assert pct(9e-5) == "9.0e-03%" and pct(1.2e-4) == "0.012%" and pct(0.12) == "12%"


def test_a_fraction_never_reads_as_a_whole_number():
    assert fmt(0.996, 2) == "0.996" and fmt(0.9996, 3) == "0.9996" and fmt(0.9987, 2) == "0.999"
    assert fmt(0.5, 2) == "0.5" and fmt(1.0, 2) == "1" and fmt(2.25, 3) == "2.25" and fmt(-0.9999, 2) == "-0.9999"


def test_a_nan_faithfulness_is_a_gap_not_a_point_at_zero():
    from test_report import synthetic_circuit

    from mechscope.report.circuit import render_circuit

    d = synthetic_circuit()
    d["curve"][3]["faithfulness"] = math.nan
    d["metrics"]["faithfulness"] = math.nan
    svg = re.search(r'<svg[^>]*id="faithfulness-plot".*?</svg>', render_circuit(d), re.S).group(0)
    tips = re.findall(r'<circle class="pt (?:faith|kept)"[^>]*><title>([^<]*)</title>', svg)
    n = int(d["curve"][3]["n_edges"])
    assert len(tips) == len(d["curve"]) - 1 and not any(t.startswith(f"{n} edges") or t.startswith("circuit:") for t in tips)


def test_the_dynamics_chart_names_each_series_unit():
    from test_report import sample_dynamics

    from mechscope.report.dynamics import render_dynamics

    page = render_dynamics(sample_dynamics())
    assert "Head scores and ICL score (nats)" not in page
    assert "ICL score (nats)" in page and "induction (max, attention share)" in page


def test_a_constant_heatmap_is_coloured_not_blank():
    from test_report import sample_heads, sample_lens

    from mechscope.report.heads import render_heads
    from mechscope.report.lens import render_lens

    d = sample_lens()
    d["lens"]["target_rank"] = [[0] * len(row) for row in d["lens"]["target_rank"]]  # top-1 everywhere: darkest
    hm = re.search(r'<svg[^>]*class="heatmap".*?</svg>', render_lens(d), re.S).group(0)
    fills = set(re.findall(r'fill="(#[0-9a-f]{6})"><title>[^<]*rank 0', hm))
    assert fills == {"#2563eb"}
    h = sample_heads(1, 1)
    h["scores"]["previous_token"] = [[0.13]]
    svg = re.findall(r'<svg[^>]*class="heatmap".*?</svg>', render_heads(h), re.S)[0]
    assert re.findall(r'fill="(#[0-9a-f]{6})"><title>a0\.h0', svg) != ["#ffffff"]


def test_the_pattern_viewer_opens_on_the_most_inductive_head_despite_a_nan():
    from test_report import sample_heads

    from mechscope.report.heads import render_heads

    h = sample_heads()
    h["scores"]["induction"] = [[math.nan, 0.9, 0.1], [0.2, 0.3, 0.4]]
    assert re.findall(r'<option value="\d+" selected>([^<]*)', render_heads(h)) == ["a0.h1"]


def test_missing_values_are_dashes_not_none():
    from test_report import sample_binding_dynamics, sample_lens, sample_sae_eval, sample_transcoders_eval

    from mechscope.report.binding import render_binding_dynamics
    from mechscope.report.lens import render_lens
    from mechscope.report.sae_eval import render_sae_eval
    from mechscope.report.transcoders import render_transcoders_eval

    s = sample_sae_eval()
    s["fvu"] = None
    tc = sample_transcoders_eval()
    tc["layers"][0].update(ce_recovered=None, ce_recovered_ci95=None)
    lens = sample_lens()
    lens["lens"]["first_top1_site_last_position"] = None
    b = sample_binding_dynamics()
    b["phases"]["systematic_step"] = None
    for page in (render_sae_eval(s), render_transcoders_eval(tc), render_lens(lens), render_binding_dynamics(b)):
        text = _text(page)
        assert not re.search(r"\bNone\b", text) and '""' not in text, text[:400]
    assert "none (not top-1 at any site)" in _text(render_lens(lens))


def test_a_long_subject_token_keeps_its_marker():
    from mechscope.report.recall import _tracing_fact

    t = {"restored_prob": {"resid": [[0.1] * 3 for _ in range(2)]}, "layers": [0, 1], "clean_prob": 0.5, "corrupt_prob": 0.1,
         "noise_std": 0.3, "window": 1}
    html = _tracing_fact(t, ["The", " Switzerland", " is"], [1])
    labels = re.findall(r'class="rl"[^>]*>([^<]*)<', html) or re.findall(r">(\*? ?\d:[^<]*)<", html)
    assert any(lab.startswith("* 1:") for lab in labels), labels


def test_the_probe_chart_plots_against_the_layer():
    from test_report import sample_probe

    from mechscope.report.probe import render_probe

    p = sample_probe()
    p.update(layers=[0, 5, 10], hooks=[f"blocks.{i}.hook_resid_post" for i in (0, 5, 10)], accuracy=[0.5, 0.6, 0.7],
             train_accuracy=[0.5, 0.6, 0.7], control_accuracy=[None] * 3, selectivity=[None] * 3)
    svg = re.findall(r"<svg.*?</svg>", render_probe(p), re.S)[0]
    assert re.findall(r"<title>(accuracy:[^<]*)</title>", svg)[-1] == "accuracy: x=10, y=0.7"
    legend = re.findall(r'<text x="[\d.]+" y="[\d.]+" font-size="11">([^<]*)</text>', svg)
    assert "control accuracy" not in legend and "accuracy" in legend  # nothing drawn, nothing in the legend


def test_confusion_cards_carry_the_percent_sign():
    from test_report import sample_confusion

    from mechscope.report.confusion import render_confusion

    d = sample_confusion()
    d["headline"]["baseline"].update(lpr=0.5, lpr_heldout=0.25)
    assert "LPR before 50.0% held-out 25.0%" in _text(render_confusion(d))


# ------------------------------------------------------------------ options accepted but never read (sweep: CLI help vs behaviour)
def _refused(res, *fragments: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stdout[-500:], res.stderr[-1500:])
    err = " ".join(res.stderr.split())
    assert "Traceback" not in res.stderr and all(f in err for f in fragments), err


TINY = "{tiny}"  # the tiny GPT-2's folder: should a refusal regress, the command runs on it, not on the embedded model


@pytest.mark.parametrize("args, says", [
    (["steer", "When Mary", "--plus", "John", "--minus", "Mary", "--layer", "1", "--feature", "5", "--scale", "3", "-m", TINY],
     "--feature is for SAE feature steering"),
    (["steer", "When Mary", "--sae", "nowhere", "--feature", "3", "--scale", "5", "--coef", "9", "-m", TINY], "--coef for ActAdd"),
    (["probe", "--labels", "language", "--corpus", "x.txt", "-m", TINY], "--corpus is read only by --labels capitalised"),
    (["sae", "train", "--hook", "blocks.0.hook_resid_post", "--hook-out", "blocks.0.hook_mlp_out", "--tokens", "64", "-m", TINY],
     "add --transcoder"),
    (["recall", "The Eiffel Tower is in", "--subject", "Eiffel Tower", "--n", "-5", "-m", TINY], "drop --n"),
    (["discover", "--method", "eap", "--ig-steps", "9", "--n", "8", "-m", TINY], "--ig-steps applies to eap-ig"),
    (["discover", "--method", "eap-ig-act", "--qk", "linear", "--n", "8", "-m", TINY], "--qk applies to eap and eap-ig"),
    (["discover", "--edges", "20", "--target", "0.3", "--n", "8", "-m", TINY], "--edges chooses the circuit instead"),
    (["discover", "--edges", "20", "--folds", "3", "--n", "8", "-m", TINY], "--folds sets the cross-validation"),
    (["discover", "--method", "acdc", "--folds", "3", "--n", "8", "-m", TINY], "ACDC prunes by its own threshold"),
    (["vision", "train", "--arch", "cnn", "--heads", "3", "--epochs", "1"], "the CNN has none"),
    (["corpus", "--model", "nowhere"], "add --tokens"),
])
def test_an_option_the_run_would_not_read_is_refused(args, says, tiny_gpt2_dir, tmp_path, monkeypatch):
    from tests.helpers.cli_inprocess import run_cli

    monkeypatch.chdir(tmp_path)  # where a command that should have been refused would write its results
    _refused(run_cli(*[tiny_gpt2_dir if a == TINY else a for a in args]), says)


def test_sae_training_from_shards_refuses_another_corpus_or_context_length(tiny_gpt2, corpus, tmp_path):
    from mechscope.activations import StoreConfig, get_corpus
    from mechscope.activations.shards import harvest
    from mechscope.sae import TrainConfig
    from mechscope.sae.train import sae_trainer

    hook = "blocks.0.hook_resid_post"
    harvest(tiny_gpt2, get_corpus(corpus, split="train"), StoreConfig(hooks=[hook], context_len=16), tmp_path / "h", 1000,
            shard_tokens=1000, corpus_spec=corpus, progress=False)
    cfg = TrainConfig(k=4, expansion=2, tokens=400, batch_tokens=200)
    with pytest.raises(MechscopeError, match="harvested from the corpus"):
        sae_trainer(tiny_gpt2, hook, cfg, tmp_path / "a", shards=tmp_path / "h", corpus=str(tmp_path / "other.txt"))
    with pytest.raises(MechscopeError, match="hold contexts of 16 tokens, not 7"):
        sae_trainer(tiny_gpt2, hook, cfg, tmp_path / "b", shards=tmp_path / "h", context_len=7)
    # the harvest's own options beside the shards are fine (a script passes the same ones to both)
    sae_trainer(tiny_gpt2, hook, cfg, tmp_path / "c", shards=tmp_path / "h", corpus=corpus, context_len=16)


def test_icl_accuracy_only_takes_one_shot():
    from mechscope.icl.config import FewShotConfig

    assert FewShotConfig(shots=1, knockout=False).shots == 1  # --accuracy-only runs no sweep
    with pytest.raises(MechscopeError, match="cross-example sweep needs --shots 2"):
        FewShotConfig(shots=1)


def test_vision_eap_refuses_steps_for_eap():
    from mechscope.vision.eap import vision_eap

    with pytest.raises(MechscopeError, match="--steps applies to eap-ig"):
        vision_eap(None, "0", "1", method="eap", steps=3)  # refused before the model is touched


def test_describe_refuses_server_options_without_the_server(tmp_path, monkeypatch):
    from mechscope.explain.db import UnitDB
    from tests.helpers.cli_inprocess import run_cli

    UnitDB(tmp_path / "u.db").close()
    for extra, says in ((["--server", "http://127.0.0.1:9/v1"], "--server applies to --explainer server"),
                        (["--timeout", "-5"], "--timeout applies to --explainer server"),
                        (["--scorer", "none", "--simulator", "nowhere"], "nothing reads it, so drop --simulator")):
        _refused(run_cli("describe", "--db", str(tmp_path / "u.db"), *extra), says)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-the-environment")  # an environment key is not an option given
    res = run_cli("describe", "--db", str(tmp_path / "u.db"), "--scorer", "none")
    assert "--api-key" not in res.stderr


def test_heads_refuses_a_top_k_that_leaves_no_random_control(tiny_gpt2_dir):
    from tests.helpers.cli_inprocess import run_cli

    _refused(run_cli("heads", "--model", tiny_gpt2_dir, "--top-k", "100", "--n", "2"), "leaves none of", "for the random control")


def test_attribute_refuses_a_corpus_it_would_not_read(tset_dir, tmp_path):
    from tests.helpers.cli_inprocess import run_cli

    _refused(run_cli("attribute", "When Mary", "--transcoders", str(tset_dir), "--contexts", "0", "--corpus", "nowhere.txt",
                     "--out", str(tmp_path / "g")), "--contexts 0 leaves them out")


def test_sae_dashboard_default_features_fit_a_small_sae(tiny_gpt2, tiny_gpt2_dir, tmp_path):
    from mechscope.sae.io import save_sae
    from mechscope.sae.model import SAE, SAEConfig
    from tests.helpers.cli_inprocess import run_cli

    d = tiny_gpt2.summary.d_model
    save_sae(SAE(SAEConfig(d_in=d, d_sae=16, architecture="relu", hook_name="blocks.0.hook_resid_post",
                           model_name=tiny_gpt2.summary.name)), tmp_path / "sae")
    res = run_cli("sae", "dashboard", str(tmp_path / "sae"), "--model", tiny_gpt2_dir, "--tokens", "256", "--ctx-len", "16",
                  "--out", str(tmp_path / "dash"), "--json")
    assert res.returncode == 0, res.stderr[-1500:]
    assert json.loads(res.stdout)["features"] == 16


def test_evaluate_refuses_another_pair_count_on_the_runs_own_task(tiny_llama, tmp_path):
    from mechscope.circuits import DiscoverConfig, discover, evaluate_saved

    res = discover(tiny_llama, DiscoverConfig(task="induction", n=12, method="eap", edges=20, labels=False, force=True,
                                              bootstrap=20), progress=False)
    res.save(tmp_path / "run")
    with pytest.raises(MechscopeError, match="held-out share would hold pairs the circuit was scored on"):
        evaluate_saved(tiny_llama, tmp_path / "run", n=16)
    again = evaluate_saved(tiny_llama, tmp_path / "run", n=12)
    assert again["edges_kept"] == int(res.circuit.sum())
    # the run's own random circuits per size: evaluate repeats the run's curve, random column too
    assert [(c["n_edges"], round(c["faithfulness"], 5), round(c["random"], 5)) for c in again["curve"]] == \
        [(c["n_edges"], round(c["faithfulness"], 5), round(c["random"], 5)) for c in res.curve]


def test_the_exemplars_pass_records_its_settings_and_seed(tiny_llama, tmp_path):
    from mechscope.explain.config import ExemplarsConfig
    from mechscope.explain.db import UnitDB
    from mechscope.explain.exemplars import harvest_exemplars

    db = UnitDB(tmp_path / "u.db", model_id=tiny_llama.summary.name)
    harvest_exemplars(tiny_llama, ExemplarsConfig(units="mlp", layers=[1], n_tokens=128, context_len=16, seed=7), db=db)
    rec = db.exemplars_settings("mlp", "", 1)
    assert rec is not None and rec["seed"] == 7 and rec["n_tokens"] == 128 and rec["corpus_digest"]
    assert db.exemplars_settings("mlp", "", 0) is None  # a layer this pass did not write


def test_the_library_never_trains_over_a_saved_vision_model(tmp_path):
    from mechscope.vision.config import DataConfig, TrainConfig
    from mechscope.vision.train import train_model

    cfg = TrainConfig(arch="cnn", width=4, epochs=1, data=DataConfig(dataset="shapes", size=16, per_class=10))
    train_model(cfg, out=tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()
    with pytest.raises(MechscopeError, match="already holds a trained vision model"):
        train_model(cfg, out=tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before


# ------------------------------------------------------------------ terminal output: text the program did not write stays text
def test_the_terminal_console_prints_markup_and_control_characters_as_text():
    import io

    from rich.table import Table
    from rich.text import Text

    from mechscope.terminal import TerminalConsole

    buf = io.StringIO()
    c = TerminalConsole(file=buf, width=120, force_terminal=True, highlight=False)
    c.print("a [/] b [bold red]x \x1b[2J done")  # rich with markup would raise MarkupError on "[/]"
    t = Table(title="corpus co[/]d.jsonl")
    t.add_column("token")
    t.add_row("tok \x1b[31mEVIL")
    t.add_row(Text("Tower\x1b[2J"))
    c.print(t)
    c.print("[yellow]note[/]: ours", markup=True)  # the program's own markup, opted into per call
    out = buf.getvalue()
    assert "a [/] b [bold red]x \\x1b[2J done" in out and "co[/]d.jsonl" in out
    assert "tok \\x1b[31mEVIL" in out and "Tower\\x1b[2J" in out
    assert "\x1b[2J" not in out and "\x1b[31m" not in out  # no ESC of the content reaches the terminal
    assert "\x1b[33mnote\x1b[0m: ours" in out


def test_tokens_prompts_and_paths_with_markup_or_escapes_do_not_break_a_command(tiny_gpt2_dir, tmp_path):
    from tests.helpers.cli_inprocess import run_cli

    out = tmp_path / "x[" / "]y"  # the path x[/]y
    res = run_cli("lens", "Mary went [/] to the [bold red]store \x1b[2J", "--model", tiny_gpt2_dir, "--out", str(out))
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert f"report: {out}" in " ".join(res.stdout.split()) or str(out / "report.html") in res.stdout.replace("\n", "")
    assert "\x1b" not in res.stdout
    res = run_cli("info", "--model", str(tmp_path / "gone\x1b[2J[/]"))
    assert res.returncode == 2 and "\x1b" not in res.stderr and "gone\\x1b[2J[/]" in res.stderr, res.stderr


def test_json_output_is_strict_even_for_tensors_and_numpy_values(capsys):
    import numpy as np
    import torch

    from mechscope.cli.common import emit_json

    emit_json({"t": torch.tensor([1.0, float("nan"), float("inf")]), "n": np.float32("nan"), "a": np.array([2.5, np.nan])})
    doc = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert doc == {"t": [1.0, None, None], "n": None, "a": [2.5, None]}
