"""ZeroShotScorer: CheXzero-style zero-shot scoring of chest X-rays with a CLIP model.

Three modes on cosine similarities s of L2-normalised embeddings:
  * pair (default for findings): p = softmax([s_pos, s_neg] / T)[0], T = 1 / logit_scale until a temperature is
    fitted on labelled data (outputs are labelled "uncalibrated" until then);
  * multi-class: softmax(logit_scale * s) across a list of prompts;
  * raw similarity for any prompt.
Each side of a pair is a prompt ensemble, averaged in embedding space and re-normalised. Text embeddings are cached
per (model, prompt) and image embeddings per image content, so adding a prompt costs one text encoding.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.special import expit

from medvit._io import write_json
from medvit.errors import ConfigError
from medvit.evaluate.calibrators import fit_temperature
from medvit.zeroshot.clip import ClipBackend, load_clip
from medvit.zeroshot.prompts import PromptConfig, PromptPair, load_prompt_config
from medvit.zeroshot.spec import default_spec

if TYPE_CHECKING:
    from medvit.data.dicom import XrayImage

_log = logging.getLogger(__name__)

UNCALIBRATED = "uncalibrated"
CALIBRATED = "temperature"
SCORE_COLUMNS = ("mode", "prompt", "prob", "similarity", "s_pos", "s_neg", "temperature", "calibration")
_BATCH = 32


def pair_probability(s_pos: np.ndarray, s_neg: np.ndarray, temperature: float) -> np.ndarray:
    """softmax([s_pos, s_neg] / T)[0], computed stably as sigmoid((s_pos - s_neg) / T)."""
    return expit((np.asarray(s_pos, np.float64) - np.asarray(s_neg, np.float64)) / temperature)


def ensemble(embeddings: torch.Tensor) -> torch.Tensor:
    """One embedding for a prompt ensemble: normalise each, average, re-normalise (open_clip's zero-shot recipe)."""
    return F.normalize(F.normalize(embeddings.float(), dim=-1).mean(dim=0), dim=-1)


def _pixels(image: XrayImage | np.ndarray) -> np.ndarray:
    return np.asarray(getattr(image, "pixels", image), dtype=np.float32)


class ZeroShotScorer:
    """Scores images against free-text prompts, prompt pairs and findings with one CLIP model."""

    def __init__(
        self,
        backend: ClipBackend,
        prompts: PromptConfig | None = None,
        *,
        normalization: str = "model",
        temperatures: dict[str, float] | None = None,
        text_cache: dict[tuple[str, str], torch.Tensor] | None = None,
        image_cache_size: int = 512,
    ) -> None:
        self.backend = backend
        self.prompts = prompts or PromptConfig()
        self.normalization = normalization
        self.temperatures: dict[str, float] = dict(temperatures or {})
        # keyed by (model id, prompt); may be shared between scorers of different models
        self.text_cache = text_cache if text_cache is not None else {}
        self._images: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._image_cache_size = image_cache_size

    @classmethod
    def load(
        cls,
        spec: str | None = None,
        *,
        prompts: str | os.PathLike[str] | None = None,
        offline: bool | None = None,
        dtype: str = "fp32",
        normalization: str = "model",
        temperatures: str | os.PathLike[str] | None = None,
        allow_random_init: bool = False,
        seed: int = 0,
    ) -> ZeroShotScorer:
        """Build from a model SPEC (default $MEDVIT_CLIP, then `model:` of the prompts config)."""
        cfg = load_prompt_config(prompts)
        backend = load_clip(default_spec(spec, cfg.model), offline=offline, dtype=dtype,
                            allow_random_init=allow_random_init, seed=seed)
        scorer = cls(backend, cfg, normalization=normalization)
        if temperatures is not None:
            scorer.load_temperatures(temperatures)
        return scorer

    # ------------------------------------------------------------------------------------------------ embeddings
    @property
    def logit_scale(self) -> float:
        return float(self.backend.logit_scale().detach())

    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) normalised embeddings of single prompts; only prompts not yet cached are encoded (one batch)."""
        mid = self.backend.model_id
        missing = list(dict.fromkeys(t for t in texts if (mid, t) not in self.text_cache))
        if missing:
            with torch.inference_mode():
                feats = self.backend.text_features(self.backend.tokenize(missing))
            for t, e in zip(missing, F.normalize(feats, dim=-1), strict=True):
                self.text_cache[(mid, t)] = e.clone()
        return torch.stack([self.text_cache[(mid, t)] for t in texts])

    def prompt_embedding(self, texts: Sequence[str]) -> torch.Tensor:
        """(D,) ensemble embedding of several phrasings of one idea."""
        return ensemble(self.text_embeddings(texts))

    def _image_key(self, pixels: np.ndarray) -> str:
        h = hashlib.sha256(np.ascontiguousarray(pixels).data)  # the buffer in place: no full-size copy
        h.update(f"{pixels.shape}|{self.normalization}|{self.backend.model_id}".encode())
        return h.hexdigest()

    def image_embeddings(self, images: Sequence[XrayImage | np.ndarray]) -> torch.Tensor:
        """(N, D) normalised image embeddings; each distinct image is encoded once (LRU cache by content hash)."""
        pixels = [_pixels(im) for im in images]
        keys = [self._image_key(p) for p in pixels]
        todo = {k: p for k, p in zip(keys, pixels, strict=True) if k not in self._images}
        items = list(todo.items())
        for start in range(0, len(items), _BATCH):
            chunk = items[start:start + _BATCH]
            batch = torch.stack([self.backend.preprocess(p, self.normalization) for _, p in chunk])
            with torch.inference_mode():
                feats = F.normalize(self.backend.image_features(batch), dim=-1)
            for (k, _), e in zip(chunk, feats, strict=True):
                self._images[k] = e.clone()
        out = torch.stack([self._images[k] for k in keys])
        for k in keys:
            self._images.move_to_end(k)
        while len(self._images) > self._image_cache_size:
            self._images.popitem(last=False)
        return out

    # ----------------------------------------------------------------------------------------------------- modes
    def similarity(self, images: Sequence[XrayImage | np.ndarray], texts: Sequence[str]) -> np.ndarray:
        """(N, P) raw cosine similarities between images and prompts, as written (no templates)."""
        return (self.image_embeddings(images) @ self.text_embeddings(texts).T).numpy()

    def multiclass(self, images: Sequence[XrayImage | np.ndarray], classes: Sequence[Sequence[str]]) -> np.ndarray:
        """(N, C) softmax(logit_scale * s) across classes; each class is an ensemble of one or more prompts."""
        text = torch.stack([self.prompt_embedding(c) for c in classes])
        logits = self.logit_scale * (self.image_embeddings(images) @ text.T)
        return torch.softmax(logits, dim=-1).numpy()

    def pair_similarities(
        self, images: Sequence[XrayImage | np.ndarray], pairs: Sequence[PromptPair]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(N, K) s_pos and s_neg for each image and pair."""
        img = self.image_embeddings(images)
        pos = torch.stack([self.prompt_embedding(p.positive) for p in pairs])
        neg = torch.stack([self.prompt_embedding(p.negative) for p in pairs])
        return (img @ pos.T).numpy(), (img @ neg.T).numpy()

    def temperature(self, name: str) -> tuple[float, str]:
        """The pair's temperature and whether it was fitted ("temperature") or is the model's own ("uncalibrated")."""
        if name in self.temperatures:
            return self.temperatures[name], CALIBRATED
        return 1.0 / self.logit_scale, UNCALIBRATED

    def score_pairs(self, image: XrayImage | np.ndarray, pairs: Sequence[PromptPair]) -> pd.DataFrame:
        """One image against pairs: columns name, prob, s_pos, s_neg, temperature, calibration."""
        s_pos, s_neg = self.pair_similarities([image], pairs)
        rows = []
        for j, pair in enumerate(pairs):
            t, status = self.temperature(pair.name)
            rows.append({"name": pair.name, "prob": float(pair_probability(s_pos[0, j], s_neg[0, j], t)),
                         "s_pos": float(s_pos[0, j]), "s_neg": float(s_neg[0, j]), "temperature": t,
                         "calibration": status})
        return pd.DataFrame(rows)

    def score_table(
        self,
        image: XrayImage | np.ndarray,
        prompts: Sequence[str],
        pairs: Sequence[PromptPair],
        *,
        multiclass: bool = False,
    ) -> pd.DataFrame:
        """One image against pairs and free-text prompts: the table the CLI prints and the app shows.

        Pair rows (mode "pair") carry the pair probability, similarity = s_pos - s_neg, the temperature and its
        calibration. Prompt rows carry the raw cosine similarity (mode "similarity"), and with `multiclass` a
        softmax across the prompts (mode "multiclass"); they are always "uncalibrated". Blank prompts are skipped.

        Returns:
            Columns `SCORE_COLUMNS`, pair rows first, in the order given.
        """
        parts = []
        if pairs:
            table = self.score_pairs(image, pairs).rename(columns={"name": "prompt"})
            parts.append(table.assign(mode="pair", similarity=table["s_pos"] - table["s_neg"]))
        prompts = [p.strip() for p in prompts if p.strip()]
        if prompts:
            rows = pd.DataFrame({"mode": "similarity", "prompt": prompts, "prob": np.nan,
                                 "similarity": self.similarity([image], prompts)[0], "calibration": UNCALIBRATED})
            if multiclass:
                rows["prob"] = self.multiclass([image], [[p] for p in prompts])[0]
                rows["mode"] = "multiclass"
            parts.append(rows)
        if not parts:
            return pd.DataFrame(columns=list(SCORE_COLUMNS))
        return pd.concat(parts, ignore_index=True).reindex(columns=list(SCORE_COLUMNS))

    def finding_pairs(self, findings: Sequence[str]) -> list[PromptPair]:
        """The default pair of each finding, from the prompts config."""
        return [self.prompts.finding_pair(f) for f in findings]

    def requested_pairs(
        self, findings: Sequence[str], pair_texts: Sequence[str], *, templated: bool = False
    ) -> list[PromptPair]:
        """The findings' default pairs, then custom "positive|negative" lines (blank lines are skipped; a
        positive alone is negated), optionally rendered through the templates."""
        custom = (self.prompts.parse_pair(text, templated=templated) for text in pair_texts)
        return self.finding_pairs(findings) + [p for p in custom if p]

    def pair_probabilities(
        self, images: Sequence[XrayImage | np.ndarray], pairs: Sequence[PromptPair], *, calibrated: bool = True
    ) -> np.ndarray:
        """(N, K) pair probabilities; `calibrated=False` uses the model's own temperature for every pair."""
        s_pos, s_neg = self.pair_similarities(images, pairs)
        temps = [self.temperature(p.name)[0] if calibrated else 1.0 / self.logit_scale for p in pairs]
        return np.stack([pair_probability(s_pos[:, j], s_neg[:, j], t) for j, t in enumerate(temps)], axis=1)

    # ----------------------------------------------------------------------------------------------- calibration
    def fit_temperatures(
        self, pairs: Sequence[PromptPair], s_pos: np.ndarray, s_neg: np.ndarray, labels: np.ndarray
    ) -> dict[str, float]:
        """Fit one temperature per pair on labelled images and use them from now on.

        Takes the (N, K) similarities from `pair_similarities` (computed in chunks for large sets) and (N, K) 0/1
        labels with NaN = unknown. Reuses `medvit.calibrators.fit_temperature` on the model-scale logits
        logit_scale * (s_pos - s_neg); the stored T is absolute: p = softmax([s_pos, s_neg] / T)[0].
        Pairs with a single class are left uncalibrated.
        """
        scale = self.logit_scale
        fitted = {}
        for j, pair in enumerate(pairs):
            y = labels[:, j]
            known = ~np.isnan(y)
            if len(np.unique(y[known])) < 2:
                _log.warning("%s: needs positive and negative labels to fit a temperature; left uncalibrated",
                             pair.name)
                continue
            rel = fit_temperature(scale * (s_pos[known, j] - s_neg[known, j]), y[known])
            fitted[pair.name] = rel / scale
        self.temperatures.update(fitted)
        return fitted

    def save_temperatures(self, path: str | os.PathLike[str]) -> None:
        """Write the fitted temperatures with the model and preprocessing they belong to (atomically)."""
        write_json(path, {"model": self.backend.model_id, "normalization": self.normalization,
                          "method": CALIBRATED, "temperatures": self.temperatures})

    def load_temperatures(self, path: str | os.PathLike[str]) -> None:
        """Use temperatures fitted earlier for this same model and preprocessing (others are refused)."""
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
            temps = {str(k): float(v) for k, v in doc["temperatures"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"cannot read zero-shot temperatures {path}: {e}") from None
        if doc.get("model") != self.backend.model_id:
            raise ConfigError(f"{path} was fitted for {doc.get('model')!r}, not {self.backend.model_id!r}")
        if doc.get("normalization", self.normalization) != self.normalization:
            raise ConfigError(f"{path} was fitted with --normalization {doc['normalization']}, "
                              f"not {self.normalization}")
        if any(not math.isfinite(t) or t <= 0 for t in temps.values()):
            raise ConfigError(f"{path}: temperatures must be positive numbers")
        self.temperatures.update(temps)
