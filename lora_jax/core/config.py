"""Adapter configs: `AdapterConfig`, what the core reads from any method's config (peft's
target-selection fields, rank and scale), and `LoraConfig` (LoRA and DoRA), with the scale
formula and its inverse."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import types
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal, TypeVar

from lora_jax.core.targets import pattern_value

_Config = TypeVar("_Config", bound="AdapterConfig")

# peft's `TaskType` values (peft/utils/peft_types.py), and the heads its task models append to
# `modules_to_save` (peft_model.py: PeftModelForSequenceClassification, ...TokenClassification,
# ...QuestionAnswering); the other task types only label the adapter file.
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS",
              "FEATURE_EXTRACTION")
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
              "QUESTION_ANS": ("qa_outputs",)}


def scaling(alpha: float, r: int, rslora: bool = False) -> float:
    """The scale of an adapter: alpha / r, or alpha / sqrt(r) with rsLoRA (peft's rule).

    >>> scaling(16, 8), scaling(16, 4, rslora=True), alpha_for(2.0, 8)
    (2.0, 8.0, 16.0)
    """
    return alpha / (math.sqrt(r) if rslora else r)


def alpha_for(scale: float, r: int, rslora: bool = False) -> float:
    """The alpha giving `scale` at rank `r` (the inverse of `scaling`)."""
    return scale * (math.sqrt(r) if rslora else r)


def is_number(value: Any, kind: type | tuple[type, ...] = (int, float)) -> bool:
    """Whether `value` is an int / float (or of `kind`), not a bool."""
    return isinstance(value, kind) and not isinstance(value, bool)


_FIELD = object()  # `_require`'s default value: the named field's own


def _first(patterns: Mapping[str, Any], names: Sequence[str], default: Any) -> Any:
    """The value of the first of `names` (last first: peft's name) that a pattern matches."""
    found = (pattern_value(patterns, name, None) for name in reversed(names))
    return next((value for value in found if value is not None), default)


class AdapterConfig:
    """What the core reads from any adapter method's config (a dataclass with peft's field
    names; `LoraConfig` is one): the fields below and these methods. The defaults stand for
    fields a method's config does not have; `lora_jax.variants.for_config` tells its variant."""

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]  # set by @dataclass
    target_modules: str | Sequence[str] | None = None
    exclude_modules: str | Sequence[str] | None = None
    layers_to_transform: int | Sequence[int] | None = None
    layers_pattern: str | Sequence[str] | None = None
    modules_to_save: Sequence[str] | None = None
    target_parameters: Sequence[str] | None = None
    bias: str = "none"
    r: int = 8
    rank_pattern: Mapping[str, int] = types.MappingProxyType({})
    alpha_pattern: Mapping[str, float] = types.MappingProxyType({})
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    task_type: str | None = None

    def __new__(cls: type[_Config], *args: Any, **kwargs: Any) -> _Config:
        """A misspelled keyword raises a TypeError that names the closest field."""
        names = [f.name for f in dataclasses.fields(cls)]
        hints = [f"{key!r}" + "".join(f" (did you mean {c!r}?)" for c in
                                      difflib.get_close_matches(key, names, n=1))
                 for key in kwargs if key not in names]
        if hints:
            raise TypeError(f"{cls.__name__} has no field {', '.join(hints)}; its fields are "
                            f"{names}")
        return super().__new__(cls)

    @property
    def dropout(self) -> float:
        """The dropout rate on the adapter's input (`lora_dropout`)."""
        return getattr(self, "lora_dropout", 0.0)

    @property
    def default_alpha(self) -> float:
        """The alpha of modules no `alpha_pattern` names (`lora_alpha`; r without one: scale 1)."""
        return getattr(self, "lora_alpha", self.r)

    @property
    def adapted_biases(self) -> bool:
        """Whether the biases of adapted modules train: peft's `bias="<method>_only"` (e.g.
        "lora_only", "vera_only")."""
        return self.bias.endswith("_only")

    def rank(self, *names: str) -> int:
        """The rank of the module known by `names` (`rank_pattern` overrides `r`; the last name,
        peft's, is tried first)."""
        return _first(self.rank_pattern, names, self.r)

    def alpha_of(self, *names: str) -> float:
        """The alpha of the module known by `names` (`alpha_pattern` overrides the default; not
        `alpha`, which is a field of some methods' configs, LoKr's)."""
        return _first(self.alpha_pattern, names, self.default_alpha)

    def scaling(self, *names: str, rank: int | None = None) -> float:
        """The module's scale (`scaling` of its alpha and rank; `rank` defaults to its own)."""
        return scaling(self.alpha_of(*names), self.rank(*names) if rank is None else rank,
                       self.use_rslora)

    @property
    def task_heads(self) -> tuple[str, ...]:
        """The heads `task_type` adds to `modules_to_save` (peft's names; a model has at most
        one of "classifier" / "score", and an absent one is no error).

        >>> LoraConfig(task_type="SEQ_CLS").modules_to_save
        ('classifier', 'score')
        """
        return TASK_HEADS.get(self.task_type or "", ())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the fields (tuples as lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def _freeze(self) -> None:
        """Sequence fields as tuples, pattern fields as dicts (hashable: a static jit argument);
        then `_add_task_heads`."""
        own = {f.name for f in dataclasses.fields(self)}
        for name in ("target_modules", "exclude_modules", "modules_to_save", "layers_pattern",
                     "target_parameters", "layers_to_transform"):
            value = getattr(self, name, None)
            if name in own and isinstance(value, Sequence) and not isinstance(value, str):
                object.__setattr__(self, name, tuple(value))
        for name in ("rank_pattern", "alpha_pattern", "loftq_config"):
            if name in own:
                object.__setattr__(self, name, dict(getattr(self, name)))
        self._add_task_heads()

    def _add_task_heads(self) -> None:
        """peft's task models append their heads to `modules_to_save` (a SEQ_CLS config trains
        and saves "classifier" / "score"); a list that already ends with them (a config read
        back from its file) is kept, so `from_dict(to_dict())` appends nothing."""
        if self.task_type is None:
            return
        if self.task_type not in TASK_TYPES:
            raise ValueError(f"{type(self).__name__}.task_type must be one of "
                             f"{', '.join(TASK_TYPES)} or None (peft's TaskType), got "
                             f"{self.task_type!r}")
        # a peft TaskType member is a str: keep the plain str (json, hashing, repr).
        object.__setattr__(self, "task_type", TASK_TYPES[TASK_TYPES.index(self.task_type)])
        heads, saved = self.task_heads, tuple(self.modules_to_save or ())
        if heads and saved[len(saved) - len(heads):] != heads:
            object.__setattr__(self, "modules_to_save", saved + heads)

    def _require(self, ok: bool, name: str, want: str, value: Any = _FIELD) -> None:
        """Unless `ok`, raise "<Config>.<name> must be <want>, got <value>" (`value`: the field
        `name`'s own unless given)."""
        if not ok:
            value = getattr(self, name) if value is _FIELD else value
            raise ValueError(f"{type(self).__name__}.{name} must be {want}, got {value!r}")

    def _check_numbers(self, alpha: str | None = None, flags: Sequence[str] = (),
                       rates: Sequence[str] = ()) -> None:
        """r and rank_pattern's values are positive integers, the `alpha` field and
        alpha_pattern's values positive finite numbers, `flags` bools, `rates` in [0, 1)."""
        entries = lambda field: [(f"{field}[{k!r}]", v) for k, v in getattr(self, field).items()]
        for name, r in [("r", self.r), *entries("rank_pattern")]:
            self._require(is_number(r, int) and r > 0, name, "a positive integer", r)
        alphas = [(alpha, getattr(self, alpha))] if alpha else []
        for name, value in alphas + entries("alpha_pattern"):
            self._require(is_number(value) and math.isfinite(value) and value > 0, name,
                          "a positive finite number", value)
        for name in flags:
            self._require(isinstance(getattr(self, name), bool), name, "True or False")
        for name in rates:
            rate = getattr(self, name)
            self._require(is_number(rate) and 0 <= rate < 1, name, "in [0, 1)")

    def _check_regexes(self) -> None:
        """Raise, naming the field and the pattern, unless every field read as a regex compiles."""
        def items(value: Any) -> list[str]:
            return [value] if isinstance(value, str) else list(value or ())
        str_only = lambda value: [value] if isinstance(value, str) else []  # a list: names
        fields = {"target_modules": str_only(self.target_modules),
                  "exclude_modules": str_only(self.exclude_modules),
                  "layers_pattern": items(self.layers_pattern),
                  "modules_to_save": items(self.modules_to_save),
                  "rank_pattern": list(self.rank_pattern),
                  "alpha_pattern": list(self.alpha_pattern)}
        for field, patterns in fields.items():
            for pattern in patterns:
                try:
                    re.compile(pattern)
                except (re.error, TypeError) as err:
                    raise ValueError(f"{type(self).__name__}.{field}: {pattern!r} is not a valid "
                                     f"regex ({err}); escape special characters with "
                                     "re.escape") from None

    def _check_layer_selection(self, why: str) -> None:
        """peft's rules for layers_to_transform / layers_pattern (`why`: what peft does with a
        regex and a layer list), raised naming this config's class; also `_check_regexes`."""
        self._check_regexes()
        name = type(self).__name__
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ValueError(f"{name}.layers_pattern needs layers_to_transform to be set too")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError(
                f"{name}.layers_to_transform cannot be used with a str (regex or 'all-linear') "
                f"target_modules={self.target_modules!r} ({why}); list the module names instead"
            )

    @classmethod
    def from_dict(cls: type[_Config], fields: Mapping[str, Any]) -> _Config:
        """Inverse of `to_dict`; unknown field names raise with the closest valid name."""
        return cls(**fields)

    def replace(self: _Config, **fields: Any) -> _Config:
        """A copy with `fields` changed (checked as a new config)."""
        return self.from_dict({**self.to_dict(), **fields})

    def __hash__(self) -> int:
        return hash((type(self).__name__, json.dumps(self.to_dict(), sort_keys=True)))


@dataclasses.dataclass(frozen=True)
class LoraConfig(AdapterConfig):
    """What to adapt and how; field names, defaults and matching rules follow peft's `LoraConfig`
    (docs/guides/peft.md lists the rules, checked against peft).

    Paths are the "."-joined keys of the params tree (`transformer.h_0.attn.c_attn`, also read
    as peft's `h.0`); a scanned stack's layers are matched under peft's per-layer names too.

    - `target_modules`: a regex (`re.fullmatch`), a list of names / "."-suffixes, or
      "all-linear" (every Dense-like kernel but `lm_head`). Modules in `modules_to_save` are
      never adapted; naming a module without a weight LoRA applies to is an error.
      `exclude_modules` takes the same forms and wins.
    - `layers_to_transform` / `layers_pattern`: keep these layer indices (None or [] keep all),
      read as peft reads them; a module named in full is filtered too (as peft's docs say, not
      its code). In a scanned stack the layers left out get A = B = 0.
    - `rank_pattern` / `alpha_pattern`: {regex: value} matched against the end of the path, the
      first matching key wins; per-layer keys on a scanned stack pad its factors to the largest
      rank and make its scale an array.
    - `bias`: "none" | "all" | "lora_only" (biases of adapted modules).
    - `modules_to_save`: modules trained in full, each whose path ends with an entry.
    - `target_parameters`: `module.param` paths adapted by materialising `W + scale * A B`, for
      weights of layers without a rule; axes beyond two are kept (factors per expert) unless
      `layouts` says otherwise.
    - `task_type`: "SEQ_CLS" / "TOKEN_CLS" add "classifier" and "score" to `modules_to_save`
      ("QUESTION_ANS": "qa_outputs"); `save_peft` writes it.
    - `init_lora_weights`: True (kaiming A, B = 0), "gaussian" (A ~ N(0, 1/r^2), B = 0), False
      (both random, for tests), or, replacing the base by its residual: "pissa",
      "pissa_niter_K" (K power iterations), "olora" (QR), "loftq" (`loftq_config=
      {"loftq_bits": 4 or 8, "loftq_iter": n}`, default 4 bits, 1 iteration).
    - `use_dora`: DoRA: a trained magnitude per output feature rescales W + scale * A B.

    >>> config = LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"], lora_dropout=0.05)
    >>> config.scaling("transformer.h_0.attn.c_attn")
    2.0
    """

    r: int = 8
    lora_alpha: float = 8
    target_modules: str | Sequence[str] | None = None
    exclude_modules: str | Sequence[str] | None = None
    lora_dropout: float = 0.0
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    layers_to_transform: int | Sequence[int] | None = None
    layers_pattern: str | Sequence[str] | None = None
    init_lora_weights: bool | str = True
    modules_to_save: Sequence[str] | None = None
    target_parameters: Sequence[str] | None = None
    use_dora: bool = False
    loftq_config: Mapping[str, int] = dataclasses.field(default_factory=dict)
    task_type: str | None = None

    def __post_init__(self) -> None:
        self._freeze()
        self._validate()

    def _validate(self) -> None:
        self._check_numbers("lora_alpha", flags=("use_rslora", "use_dora"),
                            rates=("lora_dropout",))
        if isinstance(self.target_parameters, str):
            raise ValueError("LoraConfig.target_parameters must be a list of param names, got "
                             f"the str {self.target_parameters!r}")
        self._require(self.bias in ("none", "all", "lora_only"), "bias",
                      "'none', 'all' or 'lora_only'")
        from lora_jax.variants import inits  # the initialisers' registry (it imports this file)

        self._require(inits.known(self.init_lora_weights), "init_lora_weights",
                      "True, False, 'gaussian', 'pissa', 'pissa_niter_K' (K >= 1), 'olora' or "
                      "'loftq'")
        loftq = dict(self.loftq_config)
        steps = loftq.get("loftq_iter", 1)
        if set(loftq) - {"loftq_bits", "loftq_iter"} or loftq.get("loftq_bits", 4) not in (4, 8) \
                or not (isinstance(steps, int) and steps >= 1):
            raise ValueError(
                "LoraConfig.loftq_config takes loftq_bits (4 or 8) and loftq_iter (>= 1), got "
                f"{loftq!r}"
            )
        # peft rejects this too, so such an adapter could never be exported.
        self._check_layer_selection("as in peft")

    __hash__ = AdapterConfig.__hash__
