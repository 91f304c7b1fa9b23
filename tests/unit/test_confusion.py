"""Language confusion: the LCB metrics, confusion points, the prompt loader, the neuron
attribution's identities and the neuron edit, on hand-made strings and the tiny models."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from mechscope.confusion import ConfusionConfig, LangPrompt, load_prompts
from mechscope.confusion.attribution import Prefix, accumulate, logit_decomposition, neuron_gains
from mechscope.confusion.config import LANGS, check_top_n
from mechscope.confusion.edit import zeroed_neurons
from mechscope.confusion.metrics import check_response, pass_rates
from mechscope.confusion.points import confusion_point, matched_position
from mechscope.confusion.run import random_like, run_confusion
from mechscope.errors import MechscopeError
from mechscope.models.unembed import final_norm, unembed_weights

GERMAN = "Der Himmel ist heute sehr blau und klar.\nWir gehen am Nachmittag zusammen in den Park."
ENGLISH = "The weather is very nice today and we are all happy about it."


# ---------------------------------------------------------------- metrics
def test_a_german_text_passes_and_an_english_line_fails_lpr():
    good = check_response(GERMAN, "de")
    bad = check_response(GERMAN + "\n" + ENGLISH, "de")
    assert not good.line_error and not good.skipped and good.line_langs == ["de", "de"]
    assert bad.line_error and bad.english_line and bad.line_langs[-1] == "en"
    r = pass_rates([good, bad])
    assert r["scored"] == 2 and r["lpr"] == 0.5 and r["english_rate"] == 0.5
    # the same English answer is a pass when English is expected... of no prompt here; as Spanish it fails
    assert check_response(GERMAN, "es").line_error


def test_short_lines_are_skipped_and_wpr_counts_english_words():
    short = check_response("Ja.\nNein danke.", "de")
    assert short.skipped and pass_rates([short])["lpr"] is None
    with_word = check_response("Der Himmel ist heute sehr blau und weather klar.", "de", english=frozenset({"weather"}))
    assert not with_word.line_error and with_word.word_error and with_word.english_words == ["weather"]
    r = pass_rates([with_word, check_response(GERMAN, "de", english=frozenset({"weather"}))])
    assert r["lpr"] == 1.0 and r["wpr"] == 0.5


# ---------------------------------------------------------------- confusion points
def test_confusion_point_is_the_first_token_of_the_english_run():
    toks = ["Der", " Himmel", " ist", " blau", ".", "\n", "The", " sky", " is", " blue", " because", " of", " light"]
    assert confusion_point(toks) == 6
    toks2 = ["Le", " ciel", " est", " bleu", ".", " This", " is", " a", " French", " sentence"]
    assert confusion_point(toks2) == 5
    assert confusion_point(["Der", " Himmel", " ist", " heute", " sehr", " blau", "."]) is None
    assert confusion_point([]) is None


def test_matched_position_stays_inside_the_generation():
    assert matched_position(0.5, 10) == 5
    assert matched_position(1.0, 10) == 9
    assert matched_position(0.0, 1) == 0


# ---------------------------------------------------------------- prompts
def test_shipped_prompts_are_in_their_languages():
    from mechscope.confusion.langid import identify

    items = load_prompts()
    assert {p.lang for p in items} == set(LANGS)
    assert all(sum(p.lang == lang for p in items) == 30 for lang in LANGS)
    assert len({p.prompt for p in items}) == len(items)
    assert all(identify(p.prompt)[0] == p.lang for p in items)
    assert [p.lang for p in load_prompts(langs=("it",), max_per_lang=3)] == ["it"] * 3


@pytest.mark.parametrize("line,needle", [
    ('{"prompt": "Hallo Welt", "lang": "xx"}', "Unknown language code 'xx'"),
    ('{"prompt": "Hallo Welt", "lang": "en"}', "'en' cannot be"),
    ('{"prompt": "Hallo Welt"}', "lacks"),
    ('{"prompt": "  ", "lang": "de"}', "empty prompt"),
    ("not json", "not a JSON object"),
])
def test_prompt_file_errors_are_one_sentence(tmp_path, line, needle):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "Wie geht es?", "lang": "de"}\n' + line + "\n")
    with pytest.raises(MechscopeError, match=needle) as e:
        load_prompts(f)
    assert ":2" in str(e.value)


def test_a_prompt_files_language_codes_are_normalised(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "Wie spät ist es?", "lang": "DE"}\n{"prompt": "¿Qué hora es?", "lang": "es-MX"}\n')
    assert [p.lang for p in load_prompts(f)] == ["de", "es"]


def test_missing_file_and_absent_language(tmp_path):
    with pytest.raises(MechscopeError, match="does not exist"):
        load_prompts(tmp_path / "nope.jsonl")
    with pytest.raises(MechscopeError, match="No prompt"):
        load_prompts(langs=("pt",))


def test_config_and_top_n_checks():
    with pytest.raises(MechscopeError):
        ConfusionConfig(n_tokens=2)
    with pytest.raises(MechscopeError):
        ConfusionConfig(langs=("de", "zz"))
    assert ConfusionConfig(langs=("DE", " es", "fr-CA", "it_IT")).langs == ("de", "es", "fr", "it")  # as people write them
    with pytest.raises(MechscopeError, match="cannot be an expected language"):
        ConfusionConfig(langs=("EN-gb",))
    with pytest.raises(MechscopeError, match="list of code strings"):
        ConfusionConfig(langs="de")  # type: ignore[arg-type]
    with pytest.raises(MechscopeError, match="more than the 384 neurons"):
        check_top_n(385, 384)
    check_top_n(384, 384)
    assert ConfusionConfig(layers=(2, 0, 2)).layers == (0, 2)
    with pytest.raises(MechscopeError, match="not both"):
        ConfusionConfig(layers=(0,), last_layers=2)
    with pytest.raises(MechscopeError, match="at least one layer"):
        ConfusionConfig(layers=(-1,))
    for bad in (0.0, -0.02, float("nan"), float("inf"), 10.0):
        with pytest.raises(MechscopeError, match="--english-budget must be"):
            ConfusionConfig(english_budget=bad)
    assert ConfusionConfig(english_budget=0.02).max_tries == 1000 and ConfusionConfig(top_n=5, english_tries=7).max_tries == 7
    with pytest.raises(MechscopeError, match="english_tries"):
        ConfusionConfig(english_tries=-1)
    with pytest.raises(MechscopeError, match="english_contexts"):
        ConfusionConfig(english_contexts=0)


def test_cli_refuses_a_bad_english_budget_before_loading_anything():
    from typer.testing import CliRunner

    from mechscope.cli.main import app

    r = CliRunner().invoke(app, ["confusion", "--english-budget", "-1", "--model", "/nonexistent"])
    assert r.exit_code == 2 and "--english-budget must be" in r.output and "Traceback" not in r.output


# ---------------------------------------------------------------- attribution and editing
def _prefix(model) -> Prefix:
    return Prefix(model.to_tokens("When Mary and John went to the store, John gave"), 7)


def test_neurons_and_the_rest_sum_to_the_logit(tiny_model):
    dec = logit_decomposition(tiny_model, _prefix(tiny_model))
    assert dec.total == pytest.approx(dec.actual, abs=1e-4 * max(1.0, abs(dec.actual)))
    assert dec.neurons.abs().sum() > 0 and dec.attention.abs().sum() > 0


def test_neuron_gain_is_the_log_prob_change_of_adding_its_vector(tiny_model):
    m, p = tiny_model, _prefix(tiny_model)
    L = m.summary.n_layers
    g = neuron_gains(m, [p], list(range(L)))  # [1, L, d_mlp]
    assert g.shape == (1, L, m.summary.d_mlp)
    # recompute one neuron by hand: its vector added to resid_mid, through the frozen final norm
    from mechscope.models.hooks import FINAL_NORM_IN, mlp_post, resid_mid

    l, n = L - 1, int(g[0, L - 1].abs().argmax())
    _, cache = m.bridge.run_with_cache(torch.tensor([p.ids]), names_filter=lambda h: h in {FINAL_NORM_IN, resid_mid(l), mlp_post(l)})
    norm = final_norm(m)
    W_U, b_U = unembed_weights(m)
    s = norm.scale(cache[FINAL_NORM_IN][0, -1])
    r = cache[resid_mid(l)][0, -1].float()
    vec = cache[mlp_post(l)][0, -1, n].float() * m.bridge.W_out[l, n].detach().float()

    def lp(x):
        z = norm(x, s) @ W_U + (b_U if b_U is not None else 0)
        return z.log_softmax(-1)[p.target]

    assert float(g[0, l, n]) == pytest.approx(float(lp(r + vec) - lp(r)), abs=1e-4)
    assert float(g[0, l, n]) != 0.0


def test_accumulate_keeps_the_top_k_per_prefix():
    gains = torch.tensor([[[3.0, 1.0, 2.0]], [[0.0, 5.0, 4.0]]])  # [2 prefixes, 1 layer, 3 neurons]
    total, count = accumulate(gains, 2)
    assert total.tolist() == [[3.0, 5.0, 6.0]] and count.tolist() == [[1.0, 1.0, 2.0]]


def test_editing_no_neurons_changes_nothing_and_an_edit_is_undone(tiny_model):
    ids = torch.tensor([_prefix(tiny_model).ids])
    before = tiny_model(ids)
    with zeroed_neurons([tiny_model.bridge.original_model], []):
        assert torch.equal(tiny_model(ids), before)
    with zeroed_neurons([tiny_model.bridge.original_model], [(0, 1), (1, 2)]):
        assert not torch.allclose(tiny_model(ids), before)
    assert torch.equal(tiny_model(ids), before)


def test_an_edit_zeroes_exactly_those_neurons_contributions(tiny_model):
    p = _prefix(tiny_model)
    before = logit_decomposition(tiny_model, p)
    edit = [(0, 3), (tiny_model.summary.n_layers - 1, 7)]
    with zeroed_neurons([tiny_model.bridge.original_model], edit):
        after = logit_decomposition(tiny_model, p)
    for l, n in edit:
        assert before.neurons[l, n] != 0 and after.neurons[l, n] == 0
    # layer 0's other neurons read the same input, so their contributions only change through the norm scale
    assert after.total == pytest.approx(after.actual, abs=1e-4 * max(1.0, abs(after.actual)))


def test_the_plain_copy_and_the_bridge_see_the_same_edit(tiny_llama):
    from mechscope.explain.plain import plain_lm

    plain = plain_lm(tiny_llama)
    ids = torch.tensor([_prefix(tiny_llama).ids])
    edit = [(1, 5), (2, 9)]
    with zeroed_neurons([tiny_llama.bridge.original_model, plain.hf], edit):
        a = tiny_llama(ids)
        b = plain.hf(ids).logits
    assert torch.allclose(a, b, atol=1e-4)


def test_random_control_matches_the_layers_and_avoids_the_top():
    top = [(2, 1), (2, 5), (3, 0)]
    r = random_like(top, 16, seed=0)
    assert sorted(layer for layer, _ in r) == [2, 2, 3] and not set(r) & set(top)
    assert r == random_like(top, 16, seed=0) and r != random_like(top, 16, seed=1)


# ---------------------------------------------------------------- the whole run (no switch on a random model)
@pytest.mark.slow
def test_run_saves_loads_and_renders(tiny_llama, tmp_path):
    from mechscope.confusion import ConfusionResult
    from mechscope.report.confusion import render_confusion

    items = [LangPrompt("Hallo Welt", "de"), LangPrompt("Hola", "es"), LangPrompt("Ciao", "it")]
    cfg = ConfusionConfig(langs=("de", "es", "it"), n_tokens=6, top_n=5, ioi_n=0, ppl_contexts=0, batch_size=2)
    res = run_confusion(tiny_llama, items, cfg, english=frozenset())
    assert [p["split"] for p in res.prompts] == ["find", "find", "find"]
    assert len(res.conditions["baseline"]["texts"]) == 3
    assert res.lens["n_confused"] + res.lens["n_control"] <= 3
    res.save(tmp_path)
    back = ConfusionResult.load(tmp_path)
    assert back.to_dict()["headline"] == json.loads(json.dumps(res.to_dict()["headline"]))
    html = render_confusion(back.to_dict())
    assert "Language confusion" in html
    with pytest.raises(MechscopeError, match="more than the 384"):
        run_confusion(tiny_llama, items, ConfusionConfig(langs=("de", "es", "it"), top_n=385), english=frozenset())


@pytest.mark.slow
def test_run_with_switches_edits_the_top_and_random_neurons(tiny_llama, monkeypatch):
    """A random model never switches to English, so the confusion points are set by hand: the
    first two prompts switch at their second token, the others never."""
    calls = _switching(monkeypatch)
    items = [LangPrompt("Hallo Welt", "de"), LangPrompt("Hola amigo", "es"), LangPrompt("Guten Tag", "de"),
             LangPrompt("Buenos dias", "es")]
    cfg = ConfusionConfig(langs=("de", "es"), n_tokens=6, top_n=10, per_prompt=20, ioi_n=0, ppl_contexts=0, facts_n=3)
    res = run_confusion(tiny_llama, items, cfg, english=frozenset())
    assert [p["split"] for p in res.prompts] == ["find", "find", "heldout", "heldout"]
    assert res.lens["n_confused"] == 2 and res.lens["n_control"] == 2
    assert len(res.top) == 10 and len(res.random) == 10
    assert not {(x["layer"], x["neuron"]) for x in res.top} & {tuple(x) for x in res.random}
    scores = [x["score"] for x in res.top]
    assert scores == sorted(scores, reverse=True)
    assert set(res.conditions) == {"baseline", "top", "random"} and set(res.costs) == {"baseline", "top", "random"}
    # the score is the confused mean gain minus the control's
    for x in res.top:
        assert x["score"] == pytest.approx(x["confused"] - x["control"], abs=1e-5)
    assert res.confused_scores.shape == (3, 128)
    # only the layers asked for are attributed and edited, by both the top and the random edit
    calls["n"] = 0
    some = run_confusion(tiny_llama, items, replace(cfg, layers=(0, 2)), english=frozenset())
    assert some.settings["layers"] == [0, 2] and some.confused_scores.shape == (2, 128)
    assert {x["layer"] for x in some.top} <= {0, 2} and {x[0] for x in some.random} <= {0, 2}
    with pytest.raises(MechscopeError, match="layers 0-2"):
        run_confusion(tiny_llama, items, replace(cfg, layers=(3,)), english=frozenset())
    # sparing English: the plain ranking walked down, a neuron passed over when zeroing it alone
    # costs English text more than its share, by an independent computation of that cost
    import math

    from mechscope.confusion.english import english_contexts

    every = run_confusion(tiny_llama, items, replace(cfg, top_n=384), english=frozenset()).top  # the whole plain ranking
    ctx = english_contexts(tiny_llama, cfg.english_contexts, cfg.ppl_len)
    base = _bridge_loss(tiny_llama, ctx)
    budget = 0.02
    cap = math.log1p(budget) / cfg.top_n
    spared = run_confusion(tiny_llama, items, replace(cfg, english_budget=budget), english=frozenset())
    assert "English budget" in spared.settings["ranking"]
    from mechscope.report.confusion import render_confusion

    assert "English loss when zeroed alone" in render_confusion(spared.to_dict())
    assert "English loss when zeroed alone" not in render_confusion(res.to_dict())
    eligible = []
    for x in every[:len(spared.top) + 40]:
        c = _bridge_loss(tiny_llama, ctx, (x["layer"], x["neuron"])) - base
        if c <= cap:
            eligible.append(((x["layer"], x["neuron"]), c))
    assert [(x["layer"], x["neuron"]) for x in spared.top] == [nrn for nrn, _ in eligible][:len(spared.top)]
    assert len(spared.top) == 10 or any("not 10" in n for n in spared.notes)
    for x, (_, c) in zip(spared.top, eligible):
        assert x["english_cost"] == pytest.approx(c, abs=1e-5) and x["english_cost"] <= cap
    passed_over = {(x["layer"], x["neuron"]) for x in res.top} - {(x["layer"], x["neuron"]) for x in spared.top}
    assert passed_over  # the plain top held neurons English needs
    # almost nothing fits: the edit zeroes only what fits among the neurons measured, and says so
    few = run_confusion(tiny_llama, items, replace(cfg, english_budget=1e-9, english_tries=15), english=frozenset())
    assert len(few.top) < 10 and any("not 10" in n for n in few.notes)
    assert all(x["english_cost"] <= math.log1p(1e-9) / 10 for x in few.top)

@pytest.mark.slow
def test_cli_writes_the_result_and_the_report(tiny_llama_dir, tmp_path):
    from typer.testing import CliRunner

    from mechscope.cli.main import app

    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps({"prompt": p, "lang": "de"}) for p in ("Hallo", "Guten Tag")) + "\n")
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["confusion", "--prompts", str(f), "--langs", "de", "--n-tokens", "4", "--top-n", "5",
                                 "--model", tiny_llama_dir, "--facts-n", "10", "--ppl-contexts", "0", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["headline"]["baseline"]["lpr"] is None or 0 <= d["headline"]["baseline"]["lpr"] <= 1
    assert any("IOI cost skipped" in n for n in d["notes"])  # the tiny tokenizer has too few single-token names
    assert (out / "confusion.json").is_file() and (out / "confusion.safetensors").is_file() and (out / "report.html").is_file()


def test_a_prompt_file_with_a_byte_order_mark_is_read(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + '{"prompt": "Wie geht es?", "lang": "de"}\n'.encode())
    assert [p.lang for p in load_prompts(f)] == ["de"]


def test_perplexity_contexts_fit_a_model_with_64_learned_positions(tiny_gpt2):
    from mechscope.confusion.cost import CostProbe

    probe = CostProbe(tiny_gpt2, ioi_n=0, ppl_contexts=2, facts_n=3)
    assert probe.ppl is not None and probe.ppl.shape == (2, 64)  # min(128, the model's 64 positions)
    assert probe.measure()["perplexity"] > 1


def _switching(monkeypatch):
    """The first two prompts of every four switch to English at their second token (a random model never does)."""
    import mechscope.confusion.run as run_mod

    calls = {"n": 0}

    def fake_point(tokens, min_words=3):
        i = calls["n"] % 4
        calls["n"] += 1
        return 1 if i < 2 and len(tokens) > 1 else None

    monkeypatch.setattr(run_mod, "confusion_point", fake_point)
    return calls


def _comparable(res) -> dict:
    d = res.to_dict()
    return {k: v for k, v in d.items() if k != "timing"}


@pytest.mark.slow
def test_a_checkpointed_run_resumes_only_the_missing_stages(tiny_llama, tmp_path, monkeypatch):
    import mechscope.confusion.attribution as attr_mod
    import mechscope.confusion.run as run_mod
    from mechscope.progress import Recorder

    calls = _switching(monkeypatch)
    items = [LangPrompt("Hallo Welt", "de"), LangPrompt("Hola amigo", "es"), LangPrompt("Guten Tag", "de"),
             LangPrompt("Buenos dias", "es")]
    cfg = ConfusionConfig(langs=("de", "es"), n_tokens=6, top_n=10, per_prompt=20, ioi_n=0, ppl_contexts=0, facts_n=20)
    straight = run_confusion(tiny_llama, items, cfg, english=frozenset())
    calls["n"] = 0
    first = run_confusion(tiny_llama, items, cfg, english=frozenset(), checkpoint=tmp_path)
    assert _comparable(first) == _comparable(straight)
    pieces = tmp_path / "confusion-partial"
    names = sorted(p.name for p in pieces.iterdir())
    assert names == sorted(["key.json", "generate.json", "generate-top.json", "generate-random.json", "lens-confused.json",
                            "lens-control.json", "cost-baseline.json", "cost-top.json", "cost-random.json",
                            "gains-L0.safetensors", "gains-L1.safetensors", "gains-L2.safetensors"])
    # a kill after the first generation and one layer's attribution: the rest is done again, the same
    for name in names:
        if name not in ("key.json", "generate.json", "gains-L1.safetensors"):
            (pieces / name).unlink()
    gens, states = [0], [0]
    real_gen, real_states = run_mod.greedy_generate, attr_mod._states
    monkeypatch.setattr(run_mod, "greedy_generate", lambda *a, **k: gens.__setitem__(0, gens[0] + 1) or real_gen(*a, **k))
    monkeypatch.setattr(attr_mod, "_states", lambda m, p, layers: states.append(tuple(layers)) or real_states(m, p, layers))
    calls["n"] = 0
    rec = Recorder()
    resumed = run_confusion(tiny_llama, items, cfg, english=frozenset(), checkpoint=tmp_path, progress=rec)
    assert gens[0] == 2  # the top and random edits' generations; the unedited one was read
    assert set(states[1:]) == {(0, 2)}  # layer 1's gains were read
    assert _comparable(resumed) == _comparable(straight)
    assert any("resuming: 2 finished stages" in n for n in rec.notes)  # said, not saved in the result
    # other settings: the stages are discarded, and the run says so
    calls["n"] = 0
    rec = Recorder()
    other = run_confusion(tiny_llama, items, replace(cfg, top_n=5), english=frozenset(), checkpoint=tmp_path, progress=rec)
    assert any("discarded" in n for n in rec.notes) and len(other.top) == 5


# ---------------------------------------------------------------- what neurons are worth to English
def _bridge_loss(model, ctx, zero=None) -> float:
    """Mean next-token loss through the bridge, with one neuron's activation set to 0 by a hook
    (an independent route: the spare measures on the plain copy with its weight column zeroed)."""
    from mechscope.models.hooks import mlp_post

    hooks = []
    if zero is not None:
        def hook(x, hook):
            x = x.clone()
            x[..., zero[1]] = 0
            return x
        hooks = [(mlp_post(zero[0]), hook)]
    with torch.no_grad():
        logits = model.bridge.run_with_hooks(ctx, fwd_hooks=hooks)
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ctx[:, 1:].flatten()))


def test_sparing_english_measures_each_neurons_zeroing_and_keeps_the_first_within_their_share(tiny_model):
    import math

    from mechscope.confusion.english import mean_loss, spare_english
    from mechscope.explain.plain import plain_lm

    m = tiny_model
    hf = plain_lm(m).hf
    ctx = torch.randint(1, 200, (3, 12), generator=torch.Generator().manual_seed(0))
    assert mean_loss(hf, ctx, batch_size=2) == pytest.approx(_bridge_loss(m, ctx), rel=1e-5)
    L = m.summary.n_layers
    ranking = [(l, n) for n in range(6) for l in range(L)]
    budget, top_n = 0.5, 4
    kept, costs = spare_english(hf, ranking, ctx, top_n, budget, max_tries=len(ranking))
    base = _bridge_loss(m, ctx)
    for neuron, c in costs.items():
        assert c == pytest.approx(_bridge_loss(m, ctx, neuron) - base, abs=1e-5)
    cap = math.log1p(budget) / top_n
    measured = list(costs)
    assert measured == ranking[:len(measured)]  # walked in ranking order
    assert kept == [x for x in measured if costs[x] <= cap][:top_n]
    if len(kept) == top_n:
        assert measured[-1] == kept[-1]  # it stops once top_n are kept
    assert mean_loss(hf, ctx) == pytest.approx(base, rel=1e-5)  # every zeroed column restored
    few, c2 = spare_english(hf, ranking, ctx, top_n, budget, max_tries=3)
    assert len(c2) == 3 and few == [x for x in ranking[:3] if costs[x] <= cap]
    for bad in (0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(MechscopeError, match="budget must be a relative perplexity"):
            spare_english(hf, ranking, ctx, top_n, bad, 5)
    with pytest.raises(MechscopeError, match=r"\[n, pos\]"):
        mean_loss(hf, torch.zeros(2, 1, dtype=torch.long))


def test_english_contexts_come_from_the_training_split_and_fit_the_model(tiny_gpt2):
    from mechscope.activations.corpus import get_corpus
    from mechscope.activations.store import pack_contexts
    from mechscope.confusion.english import english_contexts

    ctx = english_contexts(tiny_gpt2, n=3, length=500)
    assert ctx.shape == (3, 64)  # the tiny GPT-2 has 64 learned positions
    held = pack_contexts(tiny_gpt2.tokenizer, get_corpus(split="heldout"), 64)
    assert ctx[0].tolist() != next(iter(held))  # not the cost probe's held-out text
    train = pack_contexts(tiny_gpt2.tokenizer, get_corpus(split="train"), 64)
    assert next(iter(train)) == ctx[0].tolist()
