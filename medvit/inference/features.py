"""Where the out-of-distribution check gets an image's pooled features, fastest faithful source first.

The statistics (`medvit.evaluate.ood`) were fitted on eager fp32 features. The served engine's graph outputs the
features of the very pass that gives the logits, so where its distances stay within `FEATURE_DRIFT` of eager
fp32's on the run's real images, the check costs nothing extra. An engine further off (int8 with 7-bit weights on
AVX2 measured ~8% of the threshold on the demo) gets a second pass through the verified fp32 ONNX graph, which is
several times faster than eager torch on a shared CPU; without ONNX Runtime, an eager fp32 pass. The choice is made
once, at the first image that needs the check, and logged.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
from torch import nn

from medvit.evaluate.ood import FEATURE_DRIFT, OodStats
from medvit.inference.engines import Backend, unavailable_reason
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

    def __call__(self, x: np.ndarray, served_features: np.ndarray | None) -> np.ndarray | None:
        """Features of the batch `x`, given what the served pass returned; None: let the check run eager fp32."""
        with self._lock:
            if not self._chosen:
                self._source, self._chosen = self._choose(), True
        if self._source is None:
            return None
        if self._source is self.served:
            return served_features
        return self._source.run(x)[1]

    def _choose(self) -> Backend | None:
        if self.served.name == "torch":  # eager fp32: exactly the features the statistics were fitted on
            return self.served if callable(getattr(self.model, "forward_with_features", None)) else None
        inputs = reference_inputs(self.info.config, self.info.preprocessing, n=2)
        drift = feature_drift(self.served, self.model, inputs, self.stats)
        if drift is not None and drift <= FEATURE_DRIFT:
            _log.info("out-of-distribution check: %s's own features (%.1f%% of the threshold from eager fp32)",
                      self.served.name, 100 * drift)
            return self.served
        why = "has no features output" if drift is None else f"is {drift:.1%} of the threshold from eager fp32"
        if unavailable_reason("onnx") is None:
            fp32 = verified_engine(self.model, self.info, "onnx", inputs)
            fp32_drift = feature_drift(fp32, self.model, inputs, self.stats)
            if fp32_drift is not None and fp32_drift <= FEATURE_DRIFT:
                _log.info("out-of-distribution check: a second pass through the fp32 ONNX graph, since %s %s",
                          self.served.name, why)
                return fp32
        _log.info("out-of-distribution check: a second, eager fp32 pass, since %s %s", self.served.name, why)
        return None
