"""Teacher-forced scoring of a continuation after a cache: the one place quality is computed.

Given a context's KV (exact or decoded) and continuation token ids, run the model over the
continuation with the cache in place and return per-position log-probabilities. Comparing two
runs gives the metrics codec targets are stated in: KL divergence of next-token distributions
(nats/token, from the reference run), top-1 agreement, and the perplexity ratio."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvc.runtime.cache import to_transformers_cache
from kvc.runtime.kv import ContextKV


@torch.inference_mode()
def continuation_logprobs(lm, kv: ContextKV, continuation_ids: list[int]) -> torch.Tensor:
    """log-softmax over the vocabulary at each continuation position: ``[len(continuation), vocab]``.

    Row i predicts ``continuation_ids[i + 1]``; the last row predicts whatever would come next."""
    cache = to_transformers_cache(kv, lm.model.config, device=lm.device)
    start = kv.num_tokens
    ids = torch.tensor([continuation_ids], device=lm.device)
    positions = torch.arange(start, start + len(continuation_ids), device=lm.device)
    logits = lm.model(input_ids=ids, past_key_values=cache, use_cache=True, cache_position=positions).logits[0]
    return torch.log_softmax(logits.float(), dim=-1).cpu()


@dataclass
class QualityScores:
    kl: float  # mean KL(reference || test) over positions, nats/token
    top1_agreement: float  # fraction of positions where both runs' argmax agree
    nll: float  # mean negative log-likelihood of the continuation under the test run
    reference_nll: float

    @property
    def perplexity_ratio(self) -> float:
        return math.exp(self.nll - self.reference_nll)


def compare(reference: torch.Tensor, test: torch.Tensor, continuation_ids: list[int]) -> QualityScores:
    """Scores of ``test`` log-probs against ``reference`` log-probs for the same continuation."""
    kl = (reference.exp() * (reference - test)).sum(-1).clamp_min(0).mean().item()
    agree = (reference.argmax(-1) == test.argmax(-1)).float().mean().item()
    targets = torch.tensor(continuation_ids[1:])
    rows = torch.arange(len(targets))
    nll = -test[rows, targets].mean().item() if len(targets) else 0.0
    ref_nll = -reference[rows, targets].mean().item() if len(targets) else 0.0
    return QualityScores(kl=kl, top1_agreement=agree, nll=nll, reference_nll=ref_nll)


@torch.inference_mode()
def text_logprobs(lm, context_ids: list[int], continuation_ids: list[int]) -> torch.Tensor:
    """The same rows as :func:`continuation_logprobs`, from one cache-free forward over context and
    continuation together: what an application that re-reads the text computes."""
    ids = torch.tensor([list(context_ids) + list(continuation_ids)], device=lm.device)
    logits = lm.model(input_ids=ids, use_cache=False).logits[0, len(context_ids) :]
    return torch.log_softmax(logits.float(), dim=-1).cpu()
