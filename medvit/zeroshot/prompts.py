"""Zero-shot prompt logic: templates, positive/negative pairs and label captions, read from resources/prompts.yaml.

Kept apart from the CLIP code so the wording rules (and the "No Finding" inversion guard) are testable without a
model. A `PromptPair` holds fully rendered prompt lists; the scorer ensembles each side in embedding space.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from medvit.errors import ConfigError, DatasetError
from medvit.findings import NO_FINDING, canonical
from medvit.resources import DEFAULT_PROMPTS

_log = logging.getLogger(__name__)

# A phrase that already states absence/normality must never be negated again ("no No Finding").
_NEGATED = re.compile(r"^\s*(no|not|without|normal|negative for|absence of|unremarkable)\b", re.IGNORECASE)


@dataclass(frozen=True)
class PromptPair:
    """One binary question: the positive and negative prompt ensembles (rendered text, templates applied)."""

    name: str
    positive: tuple[str, ...]
    negative: tuple[str, ...]


@dataclass(frozen=True)
class PromptConfig:
    """The parsed prompts.yaml: templates, negation, per-finding phrases, explicit pairs and caption rules."""

    templates: tuple[str, ...] = ("{}",)
    negation: str = "no {}"
    phrases: dict[str, tuple[str, ...]] = field(default_factory=dict)
    pairs: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = field(default_factory=dict)
    caption_findings: str = "chest x-ray with {}"
    caption_normal: str = "no acute cardiopulmonary findings"
    model: str | None = None

    def render(self, phrases: Iterable[str]) -> tuple[str, ...]:
        """Every phrase through every template, in order, without duplicates."""
        return tuple(dict.fromkeys(t.format(p) for p in phrases for t in self.templates))

    def negate(self, phrase: str) -> str:
        """The negative phrase for `phrase` ("pleural effusion" -> "no pleural effusion").

        Raises:
            ConfigError: `phrase` already states absence or normality, so negating it would invert the question.
        """
        if _NEGATED.match(phrase) or canonical_or_none(phrase) == NO_FINDING:
            raise ConfigError(
                f"refusing to negate {phrase!r}: it already states absence/normality, and '{self.negation}' "
                "would invert the question (CheXzero's 'no No Finding'); give an explicit pair in prompts.yaml"
            )
        return self.negation.format(phrase)

    def finding_pair(self, finding: str) -> PromptPair:
        """The default CheXzero pair for a canonical finding; explicit pairs (e.g. "No Finding") are used verbatim."""
        name = canonical(finding)
        if name in self.pairs:
            pos, neg = self.pairs[name]
            return PromptPair(name, pos, neg)
        if name == NO_FINDING:
            raise ConfigError(f"prompts.yaml needs an explicit 'pairs: {NO_FINDING}:' entry (normal vs abnormal)")
        phrases = self.phrases.get(name, (name.replace("_", " ").lower(),))
        return PromptPair(name, self.render(phrases), self.render(self.negate(p) for p in phrases))

    def custom_pair(self, positive: str, negative: str | None = None, *, templated: bool = False) -> PromptPair:
        """A user pair "POS|NEG"; without NEG the negative is the negation of POS. Templates only if asked."""
        negative = negative if negative is not None else self.negate(positive)
        if templated:
            return PromptPair(positive, self.render([positive]), self.render([negative]))
        return PromptPair(positive, (positive,), (negative,))

    def parse_pair(self, text: str, *, templated: bool = False) -> PromptPair | None:
        """A pair typed as "POS|NEG" or "POS" (negated); None for a blank line, so callers can pass raw lines."""
        pos, _, neg = text.partition("|")
        if not pos.strip():
            return None
        return self.custom_pair(pos.strip(), neg.strip() or None, templated=templated)

    def caption(self, positives: Iterable[str]) -> str:
        """A caption from an image's positive findings: "chest x-ray with cardiomegaly and pleural effusion"."""
        return self.captions(positives)[0]

    def captions(self, positives: Iterable[str]) -> tuple[str, ...]:
        """Caption variants for one image: the caption first, then the same findings through every template.

        Alignment samples one variant per epoch, so the text tower sees the phrasings zero-shot scoring uses.
        An image without findings gets the normal caption and the "No Finding" positive prompts.
        """
        names = [n for n in (canonical(f) for f in positives) if n != NO_FINDING]
        if not names:
            normal = self.pairs.get(NO_FINDING, ((), ()))[0]
            return tuple(dict.fromkeys((self.caption_normal, *normal)))
        words = [self.phrases.get(n, (n.replace("_", " ").lower(),))[0] for n in names]
        text = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
        return tuple(dict.fromkeys((self.caption_findings.format(text), *self.render([text]))))


def canonical_or_none(name: str) -> str | None:
    """The canonical finding for `name`, or None for free text that is not a finding name."""
    try:
        return canonical(name)
    except DatasetError:
        return None


def _strings(value: object, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Sequence) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"prompts config: {where} must be a non-empty list of strings")
    return tuple(value)


def _template(text: object, where: str) -> str:
    if not isinstance(text, str) or text.count("{}") != 1:
        raise ConfigError(f"prompts config: {where} must be a string with exactly one '{{}}' placeholder: {text!r}")
    return text


def prompt_config_path(path: str | os.PathLike[str] | None = None) -> Path:
    """`path`, else $MEDVIT_PROMPTS, else the repository's medvit/resources/prompts.yaml."""
    return Path(path or os.environ.get("MEDVIT_PROMPTS") or DEFAULT_PROMPTS)


def load_prompt_config(path: str | os.PathLike[str] | None = None) -> PromptConfig:
    """Read and validate a prompts YAML (see medvit/resources/prompts.yaml for the format).

    Raises:
        ConfigError: missing file, bad YAML, unknown keys or findings, malformed templates.
    """
    src = prompt_config_path(path)
    if not src.is_file():
        raise ConfigError(f"prompts config not found: {src} (pass --prompts FILE or set MEDVIT_PROMPTS)")
    try:
        tree = yaml.safe_load(src.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{src}: invalid YAML: {e}") from None
    unknown = set(tree) - {"model", "templates", "negation", "findings", "pairs", "captions"}
    if unknown:
        raise ConfigError(f"{src}: unknown keys {sorted(unknown)}")
    try:
        phrases = {canonical(k): _strings(v, f"findings.{k}") for k, v in (tree.get("findings") or {}).items()}
        pairs = {}
        for k, v in (tree.get("pairs") or {}).items():
            if not isinstance(v, dict) or set(v) != {"positive", "negative"}:
                raise ConfigError(f"{src}: pairs.{k} needs exactly 'positive' and 'negative' lists")
            pairs[canonical(k)] = (_strings(v["positive"], f"pairs.{k}.positive"),
                                   _strings(v["negative"], f"pairs.{k}.negative"))
    except DatasetError as e:
        raise ConfigError(f"{src}: {e}") from None
    captions = tree.get("captions") or {}
    cfg = PromptConfig(
        templates=tuple(_template(t, "templates[]") for t in _strings(tree.get("templates", ["{}"]), "templates")),
        negation=_template(tree.get("negation", "no {}"), "negation"),
        phrases=phrases,
        pairs=pairs,
        caption_findings=_template(captions.get("findings", "chest x-ray with {}"), "captions.findings"),
        caption_normal=_strings(captions.get("normal", "no acute cardiopulmonary findings"), "captions.normal")[0],
        model=tree.get("model"),
    )
    _log.debug("prompts config %s: %d templates, %d findings, %d explicit pairs", src, len(cfg.templates),
               len(phrases), len(pairs))
    return cfg
