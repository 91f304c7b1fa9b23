"""Synthetic training data on which induction pays off, for the toy training run.

``repeats`` (the default): each sequence is ``BOS`` followed by ``seq_len`` tokens drawn from a
fixed random bigram Markov chain (each token's successor distribution is a Dirichlet(alpha)
draw over the vocabulary, so bigram statistics are learnable but far from deterministic);
then ``n_repeats`` spans of random length ``[min_span, max_span]`` are copied from earlier in
the sequence to places in its second half (so later tokens are more often predictable from
the context, which is what the ICL score measures). Inside a copied span, after its first token, the next token is
predicted exactly by induction ("find the previous occurrence of the current token, copy its
successor"), and nowhere else. A model first learns the bigram statistics (loss from
log(vocab) to about the chain's entropy), then, if it forms an induction circuit, a second
drop on the copied spans: Olsson et al.'s phase change.

Token 0 is ``<bos>``; content tokens are ``1..vocab``, their strings ``t1``, ``t2``...
"""

from __future__ import annotations

import torch

from mechscope.heads.config import DataConfig


class ToyData:
    """Draws batches [batch, 1 + seq_len] (BOS first) from the configured distribution."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        g = torch.Generator().manual_seed(cfg.seed)
        conc = torch.full((cfg.vocab, cfg.vocab), cfg.alpha)
        gamma = torch._standard_gamma(conc, generator=g)
        self.trans = gamma / gamma.sum(-1, keepdim=True)  # [vocab, vocab]: row = successor distribution

    def entropy(self) -> float:
        """Mean bigram entropy (nats) under a uniform token marginal: roughly the loss floor
        without induction."""
        p = self.trans.clamp_min(1e-12)
        return float(-(p * p.log()).sum(-1).mean())

    def batch(self, n: int, generator: torch.Generator) -> torch.Tensor:
        c = self.cfg
        x = torch.empty(n, c.seq_len, dtype=torch.long)
        x[:, 0] = torch.randint(0, c.vocab, (n,), generator=generator)
        for t in range(1, c.seq_len):
            probs = self.trans[x[:, t - 1]]  # [n, vocab]
            x[:, t] = torch.multinomial(probs, 1, generator=generator)[:, 0]
        for i in range(n):
            for _ in range(c.n_repeats):
                span = int(torch.randint(c.min_span, c.max_span + 1, (1,), generator=generator))
                if 2 * span + 1 > c.seq_len:
                    continue
                lo = max(span + 1, c.seq_len // 2)
                if lo > c.seq_len - span:
                    continue
                dst = int(torch.randint(lo, c.seq_len - span + 1, (1,), generator=generator))
                src = int(torch.randint(0, dst - span + 1, (1,), generator=generator))
                x[i, dst : dst + span] = x[i, src : src + span].clone()
        bos = torch.zeros(n, 1, dtype=torch.long)
        return torch.cat([bos, x + 1], dim=1)  # [n, 1 + seq_len]
