"""Run in circuit-tracer's environment (.venv-ct): its own loader reads a mechscope transcoder
folder as it is (config.yaml + layer_<l>.safetensors, the layout of its local cache), its
nnsight backend loads the model folder, and ``attribute`` computes the graph for the given
tokens and logit targets. Writes the graph's tensors as safetensors (never torch.save).

usage: circuit_tracer_side.py TRANSCODERS_DIR MODEL_DIR INPUTS.safetensors OUT.safetensors [BATCH] [MAX_FEATURES] [THREADS]"""

import json
import sys
import time
from pathlib import Path

import torch
from circuit_tracer import ReplacementModel, attribute
from circuit_tracer.graph import compute_graph_scores
from circuit_tracer.utils.caching import load_transcoders_from_cache
from safetensors.torch import load_file, save_file


def written_by_transformers_5_for_4(model_dir: Path) -> None:
    """A model folder saved by transformers 5 read by 4.57 (circuit-tracer's pin): 5 keeps the
    rotary base only under ``rope_parameters`` (4.57 would silently use its default, 10,000) and
    names a tokenizer class 4.57 lacks. Rewrites both in place."""
    cfg_path, tok_path = model_dir / "config.json", model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" in rope and "rope_theta" not in cfg:
        cfg["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            cfg["rope_scaling"] = rope
        cfg_path.write_text(json.dumps(cfg, indent=2))
    if tok_path.exists():
        tok = json.loads(tok_path.read_text())
        if tok.get("tokenizer_class") == "TokenizersBackend":
            tok["tokenizer_class"] = "PreTrainedTokenizerFast"
            tok_path.write_text(json.dumps(tok, indent=2))


tc_dir, model_dir, inputs, out = (Path(a) for a in sys.argv[1:5])
written_by_transformers_5_for_4(model_dir)
batch = int(sys.argv[5]) if len(sys.argv) > 5 else 64
max_features = int(sys.argv[6]) if len(sys.argv) > 6 and int(sys.argv[6]) > 0 else None
torch.set_num_threads(int(sys.argv[7]) if len(sys.argv) > 7 else max(1, min(2, torch.get_num_threads())))
t0 = time.perf_counter()
transcoders, _ = load_transcoders_from_cache(tc_dir.name, cache_dir=tc_dir.parent, device=torch.device("cpu"),
                                             dtype=torch.float32, lazy_decoder=False)
model = ReplacementModel.from_pretrained_and_transcoders(str(model_dir), transcoders, backend="nnsight",
                                                         device=torch.device("cpu"), dtype=torch.float32)
t1 = time.perf_counter()
x = load_file(str(inputs))
g = attribute(x["tokens"], model, attribution_targets=x["logit_tokens"], batch_size=batch, max_feature_nodes=max_features)
t2 = time.perf_counter()
replacement, completeness = compute_graph_scores(g)
save_file({"adjacency": g.adjacency_matrix.float().contiguous(), "active_features": g.active_features.long().contiguous(),
           "selected_features": g.selected_features.long().contiguous(),
           "activation_values": g.activation_values.float().contiguous(), "tokens": g.input_tokens.long().contiguous(),
           "logit_probs": g.logit_probabilities.float().contiguous()}, str(out))
print(json.dumps({"replacement": float(replacement), "completeness": float(completeness),
                  "load_s": t1 - t0, "attribute_s": t2 - t1}))
