"""Shared fixtures: tiny random models saved to disk (the real loading path, no hub) and the
embedded model, loaded once per test session. Also the rule for tests that need something
outside .venv (markers ``saelens``, ``circuit_tracer``, ``llama_server`` and ``browser``): skipped with the reason when it is missing,
but a failure when ``CI`` is set, since CI installs everything (``./setup.sh --test``)."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Head-role caches (circuit labels) of this session's models go to a fresh folder, not ~/.cache,
# removed when the session ends (pytest_sessionfinish).
_OWN_CACHE = None if "MECHSCOPE_CACHE" in os.environ else tempfile.mkdtemp(prefix="mechscope-cache-")
if _OWN_CACHE is not None:
    os.environ["MECHSCOPE_CACHE"] = _OWN_CACHE
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

ROOT = Path(__file__).resolve().parents[1]
SAELENS_PY = Path(os.environ.get("MECHSCOPE_SAELENS_PYTHON", ROOT / ".venv-saelens" / "bin" / "python"))
CIRCUIT_TRACER_PY = Path(os.environ.get("MECHSCOPE_CIRCUIT_TRACER_PYTHON", ROOT / ".venv-ct" / "bin" / "python"))
LLAMA_PY = Path(os.environ.get("MECHSCOPE_LLAMA_PYTHON", ROOT / ".venv-llama" / "bin" / "python"))


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _env_missing(python: Path, probe: str, what: str, env: str) -> str | None:
    """Why a second environment cannot serve its tests (None when it can): missing, or its
    ``probe`` import fails or hangs."""
    if not python.exists():
        return f"{python} is missing (./setup.sh --test installs {what} into {env})"
    try:
        failed = subprocess.run([str(python), "-c", probe], capture_output=True, timeout=300).returncode
    except subprocess.TimeoutExpired:
        failed = True
    return f"{python} cannot import {what} (./setup.sh --test installs it)" if failed else None


@functools.cache
def _saelens_missing() -> str | None:
    probe = "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ('sae_lens', 'mechscope')))"
    return _env_missing(SAELENS_PY, probe, "SAELens with mechscope", ".venv-saelens")


@functools.cache
def _circuit_tracer_missing() -> str | None:
    return _env_missing(CIRCUIT_TRACER_PY, "import circuit_tracer.replacement_model.replacement_model_nnsight",
                        "circuit-tracer's nnsight backend", ".venv-ct")


@functools.cache
def _llama_server_missing() -> str | None:
    return _env_missing(LLAMA_PY, "import llama_cpp.server.app", "llama-cpp-python's server", ".venv-llama")


@functools.cache
def _browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    if not any(map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))) or not shutil.which("chromedriver"):
        return "chromium and chromedriver are not both on PATH (Debian: apt-get install chromium chromium-driver)"
    return None


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    for marker, missing in (("saelens", _saelens_missing), ("circuit_tracer", _circuit_tracer_missing),
                            ("llama_server", _llama_server_missing), ("browser", _browser_missing)):
        if item.get_closest_marker(marker) and (why := missing()):
            if in_ci():
                pytest.fail(f"{why}; CI must have it", pytrace=False)
            pytest.skip(why)


def _save_tiny(kind: str, path) -> str:
    import transformers

    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=512, bos_token_id=0, eos_token_id=0, n_positions=64, n_embd=64, n_layer=2, n_head=4, n_inner=128
        )
        model = transformers.GPT2LMHeadModel(cfg)
    elif kind == "neox":  # Pythia's shape: attention and MLP in parallel, partial rotary, biases
        cfg = transformers.GPTNeoXConfig(
            vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=64, rotary_pct=0.25, use_parallel_residual=True,
            bos_token_id=0, eos_token_id=0, pad_token_id=0,
        )
        model = transformers.GPTNeoXForCausalLM(cfg)
    elif kind == "gemma2":  # norms after attention and MLP, soft-capping, a sliding window, (1 + w) gains
        cfg = transformers.Gemma2Config(
            vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=64, sliding_window=8,
            final_logit_softcapping=30.0, attn_logit_softcapping=2.0, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        )
        model = transformers.Gemma2ForCausalLM(cfg)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():  # non-trivial norm gains (they start at 0, i.e. a gain of 1)
            for p in model.parameters():
                if p.dim() == 1:
                    p.normal_(0.0, 0.3, generator=gen)
    elif kind in ("qwen3", "gemma3"):  # per-head query/key norms; Gemma 3's window longer than the tests' prompts
        common = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
                      pad_token_id=0)
        if kind == "qwen3":
            model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common))
        else:
            model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(sliding_window=32, **common))
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():  # distinct query and key norm gains (Qwen3's start at 1, Gemma 3's at 0)
            for p in model.parameters():
                if p.dim() == 1:
                    p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    else:
        cfg = transformers.LlamaConfig(
            vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            bos_token_id=0, eos_token_id=0, pad_token_id=0,
        )
        model = transformers.LlamaForCausalLM(cfg)
    return save_scaled(model, path)


def save_scaled(model, path) -> str:
    """Scale a random model's weight matrices by 3 (so it has non-trivial, distinguishable
    outputs) and save it with the suite's tiny tokenizer into ``path``; returns the folder."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(3.0)
    model.save_pretrained(path, safe_serialization=True)
    _tiny_tokenizer().save_pretrained(path)
    return str(path)


_CORPUS = (
    "When Mary and John went to the store, John gave a drink to Mary. "
    "The war lasted from the year 1732 to the year 1789. The Eiffel Tower is in Paris. "
    "Then, Alice and Bob went to the park. Bob gave a ball to Alice. 0123456789 "
)


def _spm_tokenizer(corpus: list[str]):
    """A Llama-2-style tokenizer trained on ``corpus`` in a fraction of a second: the normalizer
    puts "▁" before the text and for every space (so " Mary" alone is ['▁', '▁Mary'] and after
    "to" the one token '▁Mary'), digits split one by one, BOS added, and ``decode([i])`` drops a
    word start's space ('▁Mary' -> 'Mary')."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    trainer = trainers.BpeTrainer(vocab_size=5000, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tk.train_from_iterator(corpus, trainer=trainer)
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tk.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _tiny_tokenizer():
    """A byte-level BPE tokenizer (vocab 512) trained here, so tiny models need no hub."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([_CORPUS] * 20, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> str:
    return _save_tiny("gpt2", tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    return _save_tiny("llama", tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_gpt2_dir):
    from mechscope.models import load_model

    return load_model(tiny_gpt2_dir, device="cpu")


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_dir):
    from mechscope.models import load_model

    return load_model(tiny_llama_dir, device="cpu")


@pytest.fixture(scope="session")
def tiny_neox(tmp_path_factory):
    """A tiny GPT-NeoX (Pythia's parallel blocks); its folder is ``summary.source``."""
    from mechscope.models import load_model

    return load_model(_save_tiny("neox", tmp_path_factory.mktemp("tiny_neox")), device="cpu")


@pytest.fixture(scope="session")
def tiny_gemma2(tmp_path_factory):
    """A tiny Gemma 2: a norm after the attention and after the MLP (``ln1_post``, ``ln2_post``)."""
    from mechscope.models import load_model

    return load_model(_save_tiny("gemma2", tmp_path_factory.mktemp("tiny_gemma2")), device="cpu")


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def tiny_model(request):
    return request.getfixturevalue(f"tiny_{request.param}")


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct, loaded once for the whole session."""
    from mechscope.models import load_model

    return load_model(device="cpu")


# ------------------------------------------------------------------ SIGKILL-resume tests
ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture
def one_thread():
    """Bit-identical runs need the same thread count in every process: this test's process runs
    on one thread, like the subprocesses that ``kill_when`` starts."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def kill_when(tmp_path):
    """``kill_when(args, ready, settle=0.0, timeout=300.0)``: start ``mechscope ARGS`` (or, when
    ``args`` is ``["-c", CODE]``, that Python code) as a subprocess of this interpreter on one
    thread, wait until
    ``ready`` (a path that exists, or a callable that returns true) without sleeping blindly,
    optionally let it run ``settle`` seconds more, then SIGKILL it wherever it is. Fails, with
    the command's stderr, when it exits or times out before it is ready. Returns the stderr text."""
    import signal
    import sys
    import time

    def run(args: list[str], ready, settle: float = 0.0, timeout: float = 300.0) -> str:
        check = ready if callable(ready) else Path(ready).exists
        cmd = [sys.executable, *args] if args[0] == "-c" else [sys.executable, "-m", "mechscope.cli.main", *args]
        err_path = tmp_path / f"killed-{time.monotonic_ns()}.stderr"
        with open(err_path, "wb") as err:  # a file, not a pipe: a chatty process never blocks on it
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, **ONE_THREAD_ENV})
            deadline = time.monotonic() + timeout
            try:
                while not check() and proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.02)
                ok = check()
                if ok and settle:
                    time.sleep(settle)
                if ok and proc.poll() is not None:
                    pytest.fail(f"{cmd[1:4]} finished before it could be killed; give it more work")
            finally:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        text = err_path.read_text(errors="replace")
        if not ok:
            pytest.fail(f"no checkpoint {'in time' if proc.returncode == -signal.SIGKILL else 'before it exited'}: {text[-2000:]}")
        return text

    return run


CORPUS_TEXT = (
    "When Mary and John went to the store, John gave a drink to Mary. The war lasted from the year "
    "1732 to the year 1789. The Eiffel Tower is in Paris. Then, Alice and Bob went to the park. "
    "Bob gave a ball to Alice. 0123456789 "
)


@pytest.fixture(scope="session")
def tset_dir(tiny_gpt2, tmp_path_factory):
    """A whole random transcoder set (16 features a layer) of the tiny GPT-2, in both layouts."""
    from mechscope.features.transcoder_set import random_transcoders, save_transcoders

    out = tmp_path_factory.mktemp("tset") / "set"
    save_transcoders(random_transcoders(tiny_gpt2, 16), out)
    return out


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> str:
    """A small JSONL corpus for training tests: 400 documents of CORPUS_TEXT's sentences shuffled,
    so they differ."""
    import json
    import random

    p = tmp_path_factory.mktemp("corpus") / "text.jsonl"
    rng = random.Random(0)
    sents = [s.strip() + "." for s in CORPUS_TEXT.split(".") if s.strip()]
    p.write_text("\n".join(json.dumps({"text": " ".join(rng.sample(sents, len(sents)))}) for _ in range(400)))
    return str(p)
