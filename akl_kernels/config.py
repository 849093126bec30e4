"""What a loss computes, apart from its tensors: the divergence tables and ``LossConfig``.

Every entry point (functions, Modules, fused linear losses, the Trainer) builds its configuration
with ``make_config``, which checks every option once; backends and custom ops only read it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from akl_kernels import validation as checks

# The KL family is computed from running FKL/RKL sums in the statistics sweep; the pointwise
# family needs a second sweep over sum_i f(p_i, q_i) once the normalisers are known.
KL_FAMILY = ("fkl", "rkl", "akl", "mixed_kl")
POINTWISE = ("jsd", "skew_fkl", "skew_rkl", "tvd")  # the order is the kernels' kind code - 1
DIVERGENCES = KL_FAMILY + POINTWISE

# The options each divergence takes by keyword beyond the shared ones.
DIVERGENCE_OPTIONS = {"akl": ("mu", "include_crossing"), "jsd": ("beta",), "skew_fkl": ("lam",),
                      "skew_rkl": ("lam",), "mixed_kl": ("lam",), "fkl": (), "rkl": (),
                      "tvd": ()}
# The divergence's own parameter: its keyword and its default.
PARAMETERS = {"jsd": ("beta", 0.5), "skew_fkl": ("lam", 0.1), "skew_rkl": ("lam", 0.1),
              "mixed_kl": ("lam", 0.5)}
# Parameter values where a divergence *is* FKL or RKL, so that they run the same code exactly:
# JSD(0) = FKL and JSD(1) = RKL by the TRL / Liger-Kernel convention (the formula itself tends
# to 0 at both ends); a skew KL with lambda = 0 is the plain KL.
_SAME_AS = {("jsd", 0.0): "fkl", ("jsd", 1.0): "rkl", ("skew_fkl", 0.0): "fkl",
            ("skew_rkl", 0.0): "rkl", ("mixed_kl", 0.0): "fkl", ("mixed_kl", 1.0): "rkl"}


@dataclass(frozen=True)
class LossConfig:
    """Everything a backend needs besides the tensors (built by ``make_config``).

    ``param`` is the divergence's own parameter: JSD's beta, the skew KLs' lambda, the mixed
    KL's lambda (the weight of RKL); unused otherwise. With ``with_ce`` (``distillation_loss``)
    the loss is ``kd_ratio * divergence + (1 - kd_ratio) * CE(student, labels)``, the
    cross-entropy on the unscaled student logits (T = 1), fused into the same passes; a term of
    weight exactly 0 is not evaluated into the loss or the gradient (docs/contract.md §2).
    """

    kind: str
    mu: float = 0.5
    include_crossing: bool = False
    temperature: float = 1.0
    param: float = 0.0
    with_ce: bool = False
    kd_ratio: float = 1.0
    # "" for a dense teacher (logits); a sparse teacher's tail rule, "bucket" or "renormalize"
    # (docs/contract.md §6), when the teacher comes as a TopKTeacher.
    tail: str = ""

    @property
    def needs_head_split(self) -> bool:
        return self.kind == "akl"

    @property
    def sparse(self) -> bool:
        return bool(self.tail)

    @property
    def fkl_weight(self) -> float:
        """The fixed FKL weight of the KL family (AKL's is computed per row)."""
        return {"fkl": 1.0, "rkl": 0.0, "mixed_kl": 1.0 - self.param}.get(self.kind, 0.0)

    @property
    def pointwise_code(self) -> int:
        """0 for the KL family, else 1 + the divergence's index in POINTWISE."""
        return POINTWISE.index(self.kind) + 1 if self.kind in POINTWISE else 0

    @property
    def divergence_weight(self) -> float:
        """The divergence's weight in the loss (1 without the cross-entropy)."""
        return self.kd_ratio if self.with_ce else 1.0

    @property
    def cross_entropy_weight(self) -> float:
        return 1.0 - self.kd_ratio if self.with_ce else 0.0

    def fields(self) -> tuple:
        """The values in field order (how the custom operators receive a configuration)."""
        return dataclasses.astuple(self)


_SCHEMA_TYPES = {"str": "str", "float": "float", "bool": "bool"}


def schema_arguments() -> str:
    """``LossConfig``'s fields as custom-operator schema arguments, in field order."""
    return ", ".join(f"{_SCHEMA_TYPES[field.type]} {field.name}"
                     for field in dataclasses.fields(LossConfig))


def make_config(divergence, options=None, *, temperature=1.0, kd_ratio=None,
                tail="") -> LossConfig:
    """The checked ``LossConfig`` of ``divergence`` with its keyword ``options`` (``mu``,
    ``include_crossing``, ``beta``, ``lam``); ``kd_ratio`` given means ``distillation_loss``
    (the fused cross-entropy); ``tail`` a sparse teacher's tail rule. Raises
    TypeError/ValueError naming the bad argument."""
    options = dict(options or {})
    if not isinstance(divergence, str):
        raise TypeError(f"divergence must be a str, one of {DIVERGENCES}, got "
                        f"{type(divergence).__name__}")
    if divergence not in DIVERGENCE_OPTIONS:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    unknown = sorted(set(options) - set(DIVERGENCE_OPTIONS[divergence]))
    if unknown:
        raise TypeError(f"divergence={divergence!r} takes no option {unknown[0]!r}")
    mu = options.get("mu", 0.5)
    include_crossing = options.get("include_crossing", False)
    checks.check_split_options(mu=mu, include_crossing=include_crossing)
    checks.check_temperature(temperature)
    param = 0.0
    if divergence in PARAMETERS:
        name, default = PARAMETERS[divergence]
        param = options.get(name, default)
        checks.check_unit_interval(name, param)
    with_ce = kd_ratio is not None
    if with_ce:
        checks.check_unit_interval("kd_ratio", kd_ratio)
    if tail:
        checks.check_tail(tail)
    kind = _SAME_AS.get((divergence, float(param)), divergence)
    return LossConfig(kind, float(mu), include_crossing, float(temperature), float(param),
                      with_ce, float(kd_ratio) if with_ce else 1.0, tail)
