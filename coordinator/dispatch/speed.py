"""How fast a miner answers: moving averages of time to first token and decode rate.

Measured by the coordinator on arrival of the miner's messages (never from the miner's own
claims): time to first token from the moment the job was queued for the miner to its first
token chunk, and decode rate as the tokens after the first chunk divided by the time between the
first and the last chunk. Both are exponential moving averages, so a miner that slows down (a
busier GPU, a thermal throttle) is noticed within a few jobs; a job cut short by a stop string
or a buyer who left still measures the rate of what it produced.

A first-token timeout counts as a time to first token of the whole timeout: a miner that goes
silent is slow, and the router should learn it.

Time to first token includes the prompt's prefill, so miners that happen to get long prompts
look slower; over many jobs that evens out, and the router compares miners of the same model.
"""

from __future__ import annotations

SMOOTHING = 0.2
"""Weight of the newest sample in each average: about the last ten jobs count."""


class MovingAverage:
    """An exponential moving average; the first sample is taken as is."""

    def __init__(self, *, smoothing: float = SMOOTHING) -> None:
        if not 0 < smoothing <= 1:
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing}")
        self._smoothing = smoothing
        self.value: float | None = None  # None until the first sample
        self.samples = 0  # how many samples went in

    def add(self, sample: float) -> None:
        if self.value is None:
            self.value = sample
        else:
            self.value += self._smoothing * (sample - self.value)
        self.samples += 1


class MinerSpeed:
    """One miner session's measured speed. ``None`` means not measured yet."""

    def __init__(self, *, smoothing: float = SMOOTHING) -> None:
        self._ttft = MovingAverage(smoothing=smoothing)
        self._rate = MovingAverage(smoothing=smoothing)

    @classmethod
    def measured(cls, *, ttft_s: float | None, tokens_per_s: float | None, jobs: int) -> MinerSpeed:
        """A speed measured elsewhere (by the replica the miner is connected to)."""
        speed = cls()
        speed._ttft.value, speed._ttft.samples = ttft_s, jobs
        speed._rate.value = tokens_per_s
        return speed

    @property
    def ttft_s(self) -> float | None:
        """Moving average of the time to first token, in seconds."""
        return self._ttft.value

    @property
    def tokens_per_s(self) -> float | None:
        """Moving average of the decode rate after the first token, in tokens per second."""
        return self._rate.value

    @property
    def jobs_measured(self) -> int:
        """Jobs whose first token (or first-token timeout) was measured."""
        return self._ttft.samples

    def first_token(self, seconds: float) -> None:
        """A job's first token arrived ``seconds`` after the job was sent (or never did)."""
        self._ttft.add(max(0.0, seconds))

    def decoded(self, tokens: int, seconds: float) -> None:
        """``tokens`` arrived over ``seconds`` after the first chunk; ignored when unmeasurable
        (nothing after the first chunk, or everything in the same instant)."""
        if tokens > 0 and seconds > 0:
            self._rate.add(tokens / seconds)
