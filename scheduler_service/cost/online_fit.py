"""The online correction's building blocks (see scheduler_service.cost.model): running means, an affine least-squares
fit with decaying weights, and the per-mode error tracker."""

from dataclasses import dataclass

from apex_serve.engine_stats import ErrorStats


@dataclass
class Ema:
    """A running mean over the first 1/alpha samples, an exponential moving average after: the first samples are
    not pulled towards the starting value."""

    alpha: float
    value: float = 1.0
    count: int = 0

    def update(self, sample: float) -> None:
        self.count += 1
        self.value += max(self.alpha, 1.0 / self.count) * (sample - self.value)


@dataclass
class AffineFit:
    """measured ~ a + b * predicted by online weighted least squares (see the module docstring)."""

    alpha: float
    count: int = 0
    w: float = 0.0
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    sxy: float = 0.0

    def update(self, predicted: float, measured: float) -> None:
        keep = 1.0 if self.count < 1.0 / self.alpha else 1.0 - self.alpha
        self.count += 1
        self.w = keep * self.w + 1.0
        self.sx = keep * self.sx + predicted
        self.sy = keep * self.sy + measured
        self.sxx = keep * self.sxx + predicted * predicted
        self.sxy = keep * self.sxy + predicted * measured

    @property
    def value(self) -> float:
        """The ratio of the weighted means: the factor where the predictions do not vary."""
        return self.sy / self.sx if self.sx > 0 else 1.0

    @property
    def flat(self) -> bool:
        """Whether the fit has no slope yet (nothing fitted, under 3 samples, or predictions that hardly vary):
        factor_at is then the ratio of the weighted means (value) at every prediction."""
        if self.sx <= 0 or self.count < 3:
            return True
        mean_x = self.sx / self.w
        return self.sxx / self.w - mean_x * mean_x <= (0.05 * mean_x) ** 2

    def factor_at(self, predicted: float) -> float:
        """The fitted measured / predicted at this prediction."""
        if predicted <= 0 or self.flat:
            return self.value
        mean_x, mean_y = self.sx / self.w, self.sy / self.w
        variance = self.sxx / self.w - mean_x * mean_x
        slope = min(max((self.sxy / self.w - mean_x * mean_y) / variance, 0.1), 10.0)
        fitted = mean_y + slope * (predicted - mean_x)
        return max(fitted, 0.1 * predicted) / predicted


@dataclass
class ErrorTracker:
    alpha: float
    count: int = 0
    raw_sum: float = 0.0
    corrected_sum: float = 0.0
    last_raw: float = 0.0
    last_corrected: float = 0.0

    def __post_init__(self) -> None:
        self.recent = Ema(self.alpha)

    def add(self, raw_error: float, corrected_error: float) -> None:
        self.count += 1
        self.raw_sum += abs(raw_error)
        self.corrected_sum += abs(corrected_error)
        self.recent.update(abs(corrected_error))
        self.last_raw, self.last_corrected = raw_error, corrected_error

    def stats(self) -> ErrorStats:
        return ErrorStats(
            count=self.count,
            raw_mape=self.raw_sum / self.count,
            corrected_mape=self.corrected_sum / self.count,
            recent_corrected_mape=self.recent.value,
            last_raw_error=self.last_raw,
            last_corrected_error=self.last_corrected,
        )
