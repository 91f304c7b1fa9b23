"""Run inside an environment with SAELens installed (``.venv-saelens``): the other side of the
interop test. Usage: python saelens_side.py WORKDIR

WORKDIR/inputs.safetensors holds ``x`` [n, d_in]; every WORKDIR/mechscope_*/ folder is an SAE
saved by mechscope. For each, SAELens's own loader reconstructs ``x`` and the result goes to
WORKDIR/out_<name>.safetensors. Then SAELens creates one SAE of each architecture it shares
with mechscope, with random weights, saves it with its own ``save_model`` under
WORKDIR/saelens_<arch>/ and writes its feature activations and reconstruction of ``x`` next to
it, for mechscope to load and compare."""

import sys
from pathlib import Path

import torch
from sae_lens import SAE
from sae_lens.saes import (
    JumpReLUSAE,
    JumpReLUSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
    Transcoder,
    TranscoderConfig,
)
from safetensors.torch import load_file, save_file

work = Path(sys.argv[1])
x = load_file(str(work / "inputs.safetensors"))["x"]
d_in = x.shape[1]
for folder in sorted(work.glob("mechscope_*")):
    sae = SAE.load_from_disk(str(folder), device="cpu")
    with torch.no_grad():
        save_file({"feats": sae.encode(x).contiguous(), "recon": sae(x).contiguous()}, str(work / f"out_{folder.name}.safetensors"))
    print(folder.name, type(sae).__name__)

torch.manual_seed(0)
made = {
    "standard": StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=3 * d_in)),
    "topk": TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=3 * d_in, k=5)),
    "jumprelu": JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=3 * d_in)),
    "transcoder": Transcoder(TranscoderConfig(d_in=d_in, d_sae=3 * d_in, d_out=d_in - 2, apply_b_dec_to_input=False)),
}
for name, sae in made.items():
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(torch.rand_like(sae.threshold) * 0.3)
    sae.cfg.metadata.hook_name = "blocks.1.hook_resid_pre"
    sae.cfg.metadata.model_name = "tiny"
    out = work / f"saelens_{name}"
    sae.save_model(str(out))
    with torch.no_grad():
        save_file({"feats": sae.encode(x).contiguous(), "recon": sae(x).contiguous()}, str(out / "expected.safetensors"))
    print(name, "saved")
