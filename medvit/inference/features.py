"""Where the out-of-distribution check gets an image's pooled features, fastest faithful source first.

The statistics (`medvit.evaluate.ood`) were fitted on eager fp32 features. The served engine's graph outputs the
features of the very pass that gives the logits, so where its distances stay within `FEATURE_DRIFT` of eager
fp32's on the run's real images, the check costs nothing extra. An engine further off (int8 with 7-bit weights on
AVX2 measured ~8% of the threshold on the demo) gets a second pass through the verified fp32 ONNX graph, which is
several times faster than eager torch on a shared CPU, and then scores those images alone (its logits are verified
against fp32 like any engine's): one pass instead of two. Without ONNX Runtime, an eager fp32 pass follows the
served one. The choice is made once, at the first image that needs the check, and logged.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
from torch import nn

from medvit.evaluate.ood import FEATURE_DRIFT, OodStats
from medvit.inference.engines import Backend, TorchBackend, unavailable_reason
from medvit.inference.export import verified_engine
from medvit.inference.fp32check import feature_drift, reference_inputs
from medvit.runs import RunInfo

_log = logging.getLogger(__name__)


class FeatureSource:
    """Gives the check its features: the served pass's, a fp32 graph's, or None (the check's own eager pass)."""

    def __init__(self, model: nn.Module, info: RunInfo, served: Backend, stats: OodStats) -> None:
        self.model, self.info, self.served, self.stats = model, info, served, stats
        self._lock = threading.Lock()
        self._source: Backend | None = None
        self._chosen = False

    def engine(self) -> Backend | None:
        """The engine whose pass gives checked images their logits and features: the served one when its features
        are faithful, else the fp32 graph; None: the served engine, then the check's own eager pass."""
        with self._lock:
            if not self._chosen:
                self._source, self._chosen = self._choose(), True
        return self._source

    def _choose(self) -> Backend | None:
        if self.served.name == "torch":  # eager fp32: exactly the features the statistics were fitted on
            return self.served if callable(getattr(self.model, "forward_with_features", None)) else None
        inputs = reference_inputs(self.info.config, self.info.preprocessing, n=2)
        reference = TorchBackend(self.model).run(inputs)[1]  # eager fp32, once for both candidates
        drift = feature_drift(self.served, self.model, inputs, self.stats, reference=reference)
        if drift is not None and drift <= FEATURE_DRIFT:
            _log.info("out-of-distribution check: %s's own features (%.1f%% of the threshold from eager fp32)",
                      self.served.name, 100 * drift)
            return self.served
        why = "has no features output" if drift is None else f"is {drift:.1%} of the threshold from eager fp32"
        if unavailable_reason("onnx") is None:
            fp32 = verified_engine(self.model, self.info, "onnx", inputs)
            fp32_drift = feature_drift(fp32, self.model, inputs, self.stats, reference=reference)
            if fp32_drift is not None and fp32_drift <= FEATURE_DRIFT:
                _log.info("out-of-distribution check: untagged images scored by the fp32 ONNX graph, since %s %s",
                          self.served.name, why)
                return fp32
        _log.info("out-of-distribution check: a second, eager fp32 pass, since %s %s", self.served.name, why)
        return None


def forward(served: Backend, checker: Backend | None, x: np.ndarray, mask: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """Logits of the batch `x`, the features of the checked rows (`mask`) when `checker` gives faithful ones (None:
    the check makes its own pass), and the engine that scored each row."""
    if checker is None or checker is served or not mask.any():
        logits, features = served.run(x)
        return logits, (features if checker is served else None), [served.name] * len(x)
    checked_logits, checked_features = checker.run(x[mask])
    assert checked_features is not None  # `_choose` only picks engines whose graphs have the output
    logits = np.empty((len(x), checked_logits.shape[1]), np.float32)
    logits[mask] = checked_logits
    if not mask.all():
        logits[~mask] = served.run(x[~mask])[0]
    features = np.zeros((len(x), checked_features.shape[1]), np.float32)
    features[mask] = checked_features
    return logits, features, [checker.name if m else served.name for m in mask]
