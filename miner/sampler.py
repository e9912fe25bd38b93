"""The reference sampler: the one definition of how a token is picked from a row of logits.

Every miner samples with this module, and a scorer re-uses it to check a miner's output, so the
procedure must give the same token for the same logits on any device, dtype or batch size. The
randomness is therefore not a stateful generator but Gumbel noise that is a pure function of
``(seed, job_id, position)``, and the token is ``argmax(scores + noise)`` (the Gumbel-max trick,
which draws exactly from ``softmax(scores)``).

Exact definition (version 1), for independent reimplementations
----------------------------------------------------------------
Noise for a key ``(seed, job_id, position)`` and a vocabulary of ``V`` tokens:

1. ``digest = SHA-256(b"meshmint/v1/noise\\x00" || u64be(seed) || u32be(len(j)) || j)`` where
   ``j`` is ``job_id`` in UTF-8, ``0 <= seed < 2**64``.
2. The Philox-4x64-10 key is two 64-bit words: ``k0 = u64be(digest[0:8])``,
   ``k1 = u64be(digest[8:16])``.
3. Block ``b = 1, 2, 3, ...`` is Philox-4x64-10 (Salmon et al., 2011; multipliers
   ``0xD2E7470EE14C6C93``, ``0xCA5A826395121157``; key increments ``0x9E3779B97F4A7C15``,
   ``0xBB67AE8584CAA73B``) applied to the counter ``(b, position, 0, 0)`` under ``(k0, k1)``;
   its four 64-bit output words are taken in order. The first ``V`` words ``r_0 .. r_{V-1}``
   are used. (This is ``numpy.random.Philox(key=[k0, k1], counter=[0, position, 0, 0])``
   followed by ``random_raw(V)``: numpy increments the counter before each block.)
4. ``u_i = ((r_i >> 12) + 0.5) / 2**52``, exact in float64 and strictly inside ``(0, 1)``.
5. ``g_i = -ln(-ln(u_i))`` in float64, then rounded to float32.

The position is in the counter's second word, not the first, because the first word counts
blocks: with the position there, position ``p + 1`` would re-use all but one block of position
``p`` and neighbouring tokens' noise would be shifted copies of each other.

Choosing a token from a 1-D row of logits ``x`` with parameters ``(T, top_k, top_p)``:

1. ``x`` is converted to float32. The reported log-probability is ``log_softmax(x)[token]`` at
   temperature 1 with no truncation, whatever the sampling parameters.
2. ``T == 0``: the token is ``argmax(x)``, ties going to the lowest index. No noise is used.
3. Otherwise ``z = x / float32(T)`` (IEEE float32 division, element by element).
4. Top-k (``0 < top_k < V``): every ``z_i`` below the ``top_k``-th largest value becomes
   ``-inf`` (values tied with it are kept).
5. Top-p (``top_p < 1``): order the tokens by ``z`` descending, ties by lower index first; take
   ``p = softmax(z)`` computed in float64 in that order; keep the shortest prefix whose
   cumulative probability reaches ``top_p`` (a token is kept when the probability before it is
   ``< top_p``; the first is always kept); the rest become ``-inf``.
6. The token is ``argmax(z + g)`` in float32, ties going to the lowest index.

``position`` is the index of the generated token within the completion: 0 for the first one.
"""

from __future__ import annotations

import hashlib
import math
import struct

import numpy as np
import numpy.typing as npt
import torch

from miner.engine.base import SamplingParams
from proto.limits import MAX_TOP_LOGPROBS

NOISE_DOMAIN = b"meshmint/v1/noise\x00"
_U64_LIMIT = 1 << 64
# Gumbel noise at a uniform u: 52 random bits, centred in their interval so u is never 0 or 1.
_MANTISSA_SHIFT = 12
_MANTISSA_SCALE = 2.0**-52


def noise_key(*, seed: int, job_id: str) -> tuple[int, int]:
    """The two 64-bit Philox key words for ``(seed, job_id)`` (steps 1 and 2 of the definition)."""
    if not 0 <= seed < _U64_LIMIT:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    job = job_id.encode("utf-8")
    digest = hashlib.sha256(NOISE_DOMAIN + struct.pack(">QI", seed, len(job)) + job).digest()
    k0, k1 = struct.unpack(">QQ", digest[:16])
    return k0, k1


def gumbel_noise(
    *, seed: int, job_id: str, position: int, vocab_size: int
) -> npt.NDArray[np.float64]:
    """Standard Gumbel noise for one position of one job, as float64 of shape ``(vocab_size,)``.

    A pure function of its arguments: it does not depend on call order, batch or device.
    """
    if not 0 <= position < _U64_LIMIT:
        raise ValueError(f"position must be in [0, 2**64), got {position}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    key = np.array(noise_key(seed=seed, job_id=job_id), dtype=np.uint64)
    counter = np.array([0, position, 0, 0], dtype=np.uint64)
    raw = np.random.Philox(key=key, counter=counter).random_raw(vocab_size)
    uniform = ((raw >> np.uint64(_MANTISSA_SHIFT)).astype(np.float64) + 0.5) * _MANTISSA_SCALE
    noise: npt.NDArray[np.float64] = -np.log(-np.log(uniform))
    return noise


def validate(params: SamplingParams) -> None:
    """Raises ValueError when ``params`` cannot be sampled with (bad temperature, top-p, ...)."""
    if not (math.isfinite(params.temperature) and params.temperature >= 0):
        raise ValueError(f"temperature must be finite and >= 0, got {params.temperature}")
    if not 0.0 <= params.top_p <= 1.0:  # also rejects NaN
        raise ValueError(f"top_p must be in [0, 1], got {params.top_p}")
    if params.top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {params.top_k}")
    if not 0 <= params.seed < _U64_LIMIT:
        raise ValueError(f"seed must be in [0, 2**64), got {params.seed}")
    if not 0 <= params.top_logprobs <= MAX_TOP_LOGPROBS:
        raise ValueError(
            f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {params.top_logprobs}"
        )


def logprobs_fp32(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the last dimension in float32, at temperature 1: what receipts carry."""
    return torch.log_softmax(logits.float(), dim=-1)


def top_logprobs(logprobs: torch.Tensor, count: int) -> tuple[tuple[int, float], ...]:
    """The ``count`` most likely ``(token id, logprob)`` of a 1-D row of fp32 log-probabilities,
    most likely first, ties going to the lower id (so any two implementations agree)."""
    if count <= 0:
        return ()
    count = min(count, logprobs.shape[-1])
    values, ids = torch.topk(logprobs, count)
    # topk's order among equal values is unspecified: settle ties by id.
    pairs = sorted(zip(ids.tolist(), values.tolist(), strict=True), key=lambda p: (-p[1], p[0]))
    return tuple((int(token), float(value)) for token, value in pairs)


def truncate(z: torch.Tensor, *, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then top-p on a 1-D float32 row: dropped tokens become ``-inf`` (steps 4 and 5)."""
    vocab_size = z.shape[-1]
    if 0 < top_k < vocab_size:
        kth_largest = torch.topk(z, top_k).values[-1]
        z = z.masked_fill(z < kth_largest, -math.inf)
    if top_p < 1.0:
        sorted_z, order = torch.sort(z, descending=True, stable=True)
        # float64 so that the cut-off does not move with float32 rounding of a long cumsum.
        sorted_probs = torch.softmax(sorted_z.double(), dim=-1)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        keep_sorted = before < top_p
        keep_sorted[0] = True
        keep = torch.empty_like(keep_sorted).scatter_(0, order, keep_sorted)
        z = z.masked_fill(~keep, -math.inf)
    return z


def sampling_scores(
    logits: torch.Tensor, params: SamplingParams, *, job_id: str, position: int
) -> torch.Tensor:
    """The float32 row whose argmax is the sampled token (steps 1 to 6, without the argmax).

    At temperature 0 these are the logits themselves; otherwise the scaled, truncated logits
    plus the Gumbel noise. A scorer measures a claimed token's margin as
    ``scores.max() - scores[token]``.
    """
    if logits.dim() != 1:
        raise ValueError(f"expected one row of logits, got shape {tuple(logits.shape)}")
    validate(params)
    x = logits.float()
    if params.temperature == 0:
        return x
    # A full tensor rather than a Python scalar: some devices turn division by a scalar into
    # multiplication by its reciprocal, which rounds differently.
    z = x / torch.full_like(x, params.temperature)
    z = truncate(z, top_k=params.top_k, top_p=params.top_p)
    noise = gumbel_noise(seed=params.seed, job_id=job_id, position=position, vocab_size=x.shape[0])
    return z + torch.from_numpy(noise.astype(np.float32)).to(x.device)


def sample(
    logits: torch.Tensor, params: SamplingParams, *, job_id: str, position: int
) -> tuple[int, float]:
    """Picks the token at ``position`` of the completion; returns it and its fp32 logprob.

    ``logits`` is the 1-D row for that position, in any dtype and on any device.
    """
    token, logprob, _ = sample_with_alternatives(
        logits, params, job_id=job_id, position=position, alternatives=0
    )
    return token, logprob


def sample_with_alternatives(
    logits: torch.Tensor, params: SamplingParams, *, job_id: str, position: int, alternatives: int
) -> tuple[int, float, tuple[tuple[int, float], ...]]:
    """:func:`sample`, plus the ``alternatives`` most likely tokens (:func:`top_logprobs`) from
    the same log-softmax."""
    scores = sampling_scores(logits, params, job_id=job_id, position=position)
    # torch.argmax returns the first maximal index on every backend: ties go to the lowest id.
    token = int(torch.argmax(scores).item())
    logprobs = logprobs_fp32(logits)
    return token, float(logprobs[token].item()), top_logprobs(logprobs, alternatives)
