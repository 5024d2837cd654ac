"""``ODEditConfig``: the PEFT config of ODEdit, holding the nested config of the editor it wraps."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from odedit_hf.editing.peft_types import extend_peft_type
from odedit_hf.editing.wrapper import WrapperConfig

from .lambda_net import LAMBDA_PARAMS

logger = logging.getLogger(__name__)

__all__ = [
    "GEN_POSITIONS",
    "IRM_ENVIRONMENTS",
    "LAMBDA_MODES",
    "LAMBDA_PARAMS",
    "LOC_POSITIONS",
    "ODEDIT_CONFIG_VERSION",
    "REPHRASE_KINDS",
    "SCHEDULES",
    "ODEditConfig",
]

#: Version of ODEdit's defaults; bumped whenever a default of :class:`ODEditConfig` changes, and recorded
#: with the resolved config in every results file (``ODEditMethod.resolved_config``).
ODEDIT_CONFIG_VERSION = "3"

LAMBDA_MODES: tuple[str, ...] = ("params", "sketch", "fixed")
#: The IRM environments (DESIGN §5): the edit prompt, its rephrases, the locality prompts.
IRM_ENVIRONMENTS: tuple[str, ...] = ("in_distribution", "neighbours", "ood")
GEN_POSITIONS: tuple[str, ...] = ("answer", "last_prompt")
LOC_POSITIONS: tuple[str, ...] = ("answer", "all")
REPHRASE_KINDS: tuple[str, ...] = ("rephrase", "image_rephrase")
KERNEL_BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")
#: Per-edit schedules (see ``ODEditConfig.schedule`` and :class:`~.schedule.EditSchedule`).
SCHEDULES: tuple[str, ...] = ("from_start", "warmup")


@dataclass
class ODEditConfig(WrapperConfig):
    """Configuration of ODEdit: the objective wrapped around a base editor's trainable parameters.

    The base editor (``editor``) decides which parameters an edit trains and how they act in the
    forward pass; ODEdit decides the objective: ``R = R_rel + alpha * R_loc + beta * R_gen`` plus the
    IRM-TV penalty ``lambda * P`` with ``lambda`` from a small network trained by dual ascent.

    Args:
        editor (`PeftConfig`):
            The config of the wrapped editor, e.g. peft's `LoraConfig` or odedit-hf's `FTLConfig`. Saved
            nested in `adapter_config.json` and rebuilt on load.
        alpha (`float`, defaults to 0.1):
            Weight of the locality risk `R_loc` (KL(pre-edit || post-edit) on `loc` and `m_loc`). The KL is
            zero at the first step and tiny after it, yet the primal optimiser is Adam, whose step ignores
            the gradient's size: at 1.0 the `R_loc` gradient took full-size steps past the KL's minimum and
            *raised* the KL it minimises (measured on the tiny world, see benchmarks/RESULTS.md), while
            0.1 lowers it. Raise it for long sequential runs where locality matters most.
        beta (`float`, defaults to 0.1):
            Weight of the generality risk `R_gen` (multi-scale RBF MMD^2 between hidden states of the edit
            prompt and of its rephrases).
        loc_risk (`bool`, defaults to True):
            Compute `R_loc` (ablation switch; `False` drops the term from `R`).
        gen_risk (`bool`, defaults to True):
            Compute `R_gen` (ablation switch).
        irm_penalty (`bool`, defaults to True):
            Add the IRM-TV penalty `lambda * (sum_e |dR_e/domega|)^2` (ablation switch). Environments:
            in-distribution (image + src), semantic neighbours (rephrase, image_rephrase) and
            out-of-distribution (loc, m_loc).
        rephrase_kinds (`tuple[str, ...]`, defaults to `("rephrase", "image_rephrase")`):
            Which rephrases enter `R_gen` and the neighbour environment: the text rephrase (image + rephrase)
            and/or the image rephrase (image_rephrase + src).
        num_rephrases (`int`, defaults to 1):
            Rephrase prompts per kind. An MMEdit record holds one of each; more are used only when the
            request carries extra ones (attributes `rephrases` / `image_rephrases`). The paper finds one
            beats several.
        hard_negatives (`bool`, defaults to False):
            Put the request's hard-negative locality probes (`hard_loc`, `hard_m_loc`: a look-alike entity
            asked the same relation; the embedded world's records carry them) into the out-of-distribution
            environment beside `loc` / `m_loc`: they enter `R_loc` and the penalty's OOD term. Requests
            without them contribute their plain locality prompts only. Our option (issue 18), not the paper's.
        gen_positions (`str`, defaults to `"answer"`):
            Which hidden states form the MMD samples: `"answer"` = the last-layer states at the positions
            that predict the target tokens (the last prompt token and every target token but the last), so
            one sample per target token; `"last_prompt"` = only the last prompt token (one sample per prompt).
        gen_anchor_edit (`bool`, defaults to True):
            Treat the edit prompt's hidden states as a fixed anchor in `R_gen` (no gradient through them), so
            that `R_gen` moves the rephrases' states towards the edited representation. With gradients on both
            sides the cheapest way to lower `R_gen` is to drag the edit prompt's states back towards the
            unedited rephrases, against `R_rel`.
        mmd_bandwidth_multipliers (`tuple[float, ...]`, defaults to `(0.5, 1.0, 2.0)`):
            Bandwidths sigma_q as multiples of the median pairwise distance between the samples, measured once
            per edit on the pre-edit model and then held fixed (a bandwidth that followed the shrinking
            distances would keep the kernel values constant and blow the gradient up).
        mmd_bandwidths (`tuple[float, ...]`, *optional*):
            Absolute bandwidths; when set they replace the median heuristic.
        loc_positions (`str`, defaults to `"answer"`):
            Rows of the locality KL: `"answer"` = the positions predicting the `loc_ans` / `m_loc_a` tokens,
            `"all"` = every non-padding text position.
        irm_environments (`tuple[str, ...]`, defaults to `("in_distribution", "neighbours", "ood")`):
            The environments whose omega-derivatives enter the IRM-TV penalty (DESIGN: all three). For
            ablation: the in-distribution and neighbour derivatives are `E_p[z] - z_y = NLL - H(p)`, positive
            while the target is unlikely (the penalty then helps raise it), negative once the target leads
            (the penalty then resists sharpening it) and back to 0 as p(target) -> 1; the `"ood"` term,
            `KL(p0 || p) + H(p0) - H(p)`, only asks the locality prompts to keep their pre-edit scale.
        lambda_mode (`str`, defaults to `"sketch"`):
            Input of the lambda network: `"sketch"` (a fixed random projection of the edit parameters to
            `sketch_dim` numbers, regenerated from `sketch_seed` on the fly, never stored), `"params"` (the
            flattened edit parameters, as the paper; memory grows with the edit size) or `"fixed"` (no
            network: lambda = `lambda_init`, for ablation). `"sketch"` is the default because on the
            embedded tiny world (100 single edits, seeds 0-2) it matched `"params"` in every metric within
            the seed spread at about a third of the time per edit (benchmarks/RESULTS.md).
        lambda_init (`float`, defaults to 0.01):
            Initial lambda (the network's output layer starts at zero weight and a bias giving this value).
            `dR/domega = E_p[z] - z_y` is positive while the target is unlikely and negative once it leads, so
            the penalty first helps and then resists sharpening the target; a large lambda slows edits: on an
            earlier tiny world (20 edits, FT-L) reliability was 0.25 at 0.1, 0.95 at 0.01 and 1.0 at 0.001,
            and sequential edits took 10.6 steps at 0.1 on world v3 (benchmarks/RESULTS.md, "IRM-TV trace").
            With `lambda_param="softplus"` the dual step barely moves a small lambda, so 0.001 is in effect a
            fixed lambda. The default 0.01 (config version 2, with `schedule="warmup"`) is the value of the
            ablation grid in docs/ODEDIT.md; 0.001 was the default of version 1.
        lambda_hidden_size (`int`, defaults to 64):
            Width of the two hidden layers of the 3-layer lambda network.
        sketch_dim (`int`, defaults to 128):
            Output size of the random projection in `"sketch"` mode.
        sketch_seed (`int`, defaults to 0):
            Seed of the random projection in `"sketch"` mode.
        lambda_lr (`float`, defaults to 0.3):
            Learning rate of the dual step: plain gradient ascent (SGD, ``maximize=True``) on the lambda
            network's dual objective `psi * (P - dual_slack)` (see `lambda_param`), so lambda moves in
            proportion to the penalty that remains above the slack. The default 0.3 (config version 3;
            0.1 before) is the smallest of the measured rates whose lambda moves by a median
            `|log(lambda_end / lambda_start)|` of at least 0.1 per edit on the tiny world (world seeds 0
            and 1, FT-L and LoRA, single and sequential; docs/ODEDIT.md).
        lambda_param (`str`, defaults to `"log"`):
            How the network output `out` gives lambda, and the coordinate `psi` its dual step ascends:
            `"softplus"` (lambda = Softplus(out), psi = lambda; the original: on Softplus's flat end a step
            changes lambda by about `lambda_lr * P * lambda^2`, so a small `lambda_init` hardly moves),
            `"log"` (lambda = lambda_init * exp(out), psi = out: the step changes log(lambda) by about
            `lambda_lr * (P - dual_slack)` whatever lambda is; the clamp `lambda_max` acts in log space) or
            `"scaled_softplus"` (lambda = lambda_init * Softplus(out) / log(2), psi = lambda / lambda_init:
            the step changes lambda by about `0.5 * lambda_lr * (P - dual_slack) * lambda_init` at the start,
            and lambda can fall to 0). The last two need `lambda_init > 0`. `"softplus"` was the default of
            config version 1.
        dual_slack (`float`, defaults to 0.5):
            The slack epsilon of the dual objective `psi * (P - epsilon)`: lambda rises while the penalty is
            above epsilon and falls while it is below. 0 keeps the original `lambda * P`, which (P >= 0) can
            only raise lambda (the default of config version 1). The default 0.5 equals `stop_penalty`.
        lambda_max (`float`, *optional*, defaults to 10.0):
            Upper clamp of lambda; `None` leaves it free. Ascent on a 3-layer network compounds (every layer's
            step scales the others' gradients): free, lambda reached inf within 13 steps of an edit on the
            tiny LLaVA at lambda_lr=1.
        lambda_min (`float`, *optional*):
            Lower clamp of lambda; `None`: `lambda_init / 1000` with `lambda_param="log"` (whose dual gradient
            does not fade as lambda falls: unbounded, a long fall below the slack runs the lambda network's
            weights to inf), none otherwise. At either clamp the dual step only moves lambda back inside.
        schedule (`str`, defaults to `"warmup"`):
            The phases of one edit in the per-edit loop (:class:`~odedit_hf.methods.odedit.schedule.EditSchedule`):
            `"from_start"` (the penalty and the dual step act from the first step; the edit stops once
            `R_rel` is below the editor's `stop_loss`, within the editor's step budget: the original ODEdit
            loop, kept for ablation) or `"warmup"` (as the OOD-TV-IRM reference: first at most
            `warmup_steps` steps on `R` alone -- penalty weight 0, no dual step -- ending as soon as `R_rel`
            is below the editor's `stop_loss`; then a primal-dual phase of at most `penalty_steps` steps that
            stops once `R_rel < stop_loss` and `P < stop_penalty`, after at least `min_penalty_steps` steps).
            The whole edit takes at most `warmup_steps + penalty_steps` steps.
            The `transformers.Trainer` path (`ODEditTrainer`) always applies the penalty from the start.
            `"warmup"` is the default from config version 2 (docs/ODEDIT.md: on the tiny world it raised
            single-edit M-Gen over the editor by more than `"from_start"` did, mostly through the extra
            penalised step after the fit; version 1 was `"from_start"`).
        warmup_steps (`int`, *optional*):
            `schedule="warmup"`: the most warm-up steps; `None` (default): the editor's `steps`, so that an edit
            the editor fits within its own budget always enters the primal-dual phase fitted (a warm-up cut
            short leaves P at 1e2-1e3, which sends a log-lambda to its clamp in one dual step).
        penalty_steps (`int`, defaults to 10):
            `schedule="warmup"`: the most steps of the primal-dual phase.
        min_penalty_steps (`int`, defaults to 1):
            `schedule="warmup"`: primal-dual steps taken before the stop test may end the edit.
        stop_penalty (`float`, *optional*, defaults to 0.5):
            `schedule="warmup"`: the edit stops only once `P` is below it as well (`None`: no condition on
            `P`; ignored when `irm_penalty` is off).
        kernel_backend (`str`, defaults to `"auto"`):
            Backend of the fused kernels (`"auto"`, `"triton"`, `"torch"`).

    A fixed lambda (no dual step, lambda stays at `lambda_init`) is `lambda_mode="fixed"`; no IRM-TV penalty
    at all is `irm_penalty=False`.
    """

    alpha: float = field(default=0.1, metadata={"help": "Weight of R_loc."})
    beta: float = field(default=0.1, metadata={"help": "Weight of R_gen."})
    loc_risk: bool = field(default=True, metadata={"help": "Compute R_loc."})
    gen_risk: bool = field(default=True, metadata={"help": "Compute R_gen."})
    irm_penalty: bool = field(default=True, metadata={"help": "Add the IRM-TV penalty."})
    rephrase_kinds: tuple[str, ...] = field(default=REPHRASE_KINDS, metadata={"help": "Rephrases used."})
    num_rephrases: int = field(default=1, metadata={"help": "Rephrase prompts per kind."})
    hard_negatives: bool = field(
        default=False, metadata={"help": "Hard-negative locality probes in the OOD environment."}
    )
    gen_positions: str = field(default="answer", metadata={"help": "MMD sample positions."})
    gen_anchor_edit: bool = field(
        default=True, metadata={"help": "No gradient through the edit prompt in R_gen."}
    )
    mmd_bandwidth_multipliers: tuple[float, ...] = field(
        default=(0.5, 1.0, 2.0), metadata={"help": "Multiples of the median pairwise distance."}
    )
    mmd_bandwidths: tuple[float, ...] | None = field(default=None, metadata={"help": "Absolute bandwidths."})
    loc_positions: str = field(default="answer", metadata={"help": "Rows of the locality KL."})
    irm_environments: tuple[str, ...] = field(
        default=IRM_ENVIRONMENTS, metadata={"help": "Environments in the IRM-TV penalty."}
    )
    lambda_mode: str = field(default="sketch", metadata={"help": "params | sketch | fixed."})
    lambda_init: float = field(default=0.01, metadata={"help": "Initial lambda."})
    lambda_hidden_size: int = field(default=64, metadata={"help": "Hidden width of the lambda network."})
    sketch_dim: int = field(default=128, metadata={"help": "Sketch size."})
    sketch_seed: int = field(default=0, metadata={"help": "Sketch seed."})
    lambda_lr: float = field(default=0.3, metadata={"help": "Dual learning rate."})
    lambda_max: float | None = field(default=10.0, metadata={"help": "Upper clamp of lambda."})
    lambda_param: str = field(default="log", metadata={"help": "softplus | log | scaled_softplus."})
    dual_slack: float = field(
        default=0.5, metadata={"help": "Slack epsilon of the dual: lambda * (P - eps)."}
    )
    lambda_min: float | None = field(default=None, metadata={"help": "Lower clamp of lambda."})
    schedule: str = field(default="warmup", metadata={"help": "from_start | warmup."})
    warmup_steps: int | None = field(
        default=None, metadata={"help": "warmup schedule: most warm-up steps (None: the editor's steps)."}
    )
    penalty_steps: int = field(default=10, metadata={"help": "warmup schedule: most primal-dual steps."})
    min_penalty_steps: int = field(
        default=1, metadata={"help": "warmup schedule: primal-dual steps before the stop test."}
    )
    stop_penalty: float | None = field(
        default=0.5, metadata={"help": "warmup schedule: stop only once P is below this."}
    )
    kernel_backend: str = field(default="auto", metadata={"help": "auto | triton | torch."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = extend_peft_type("ODEDIT")
        where = "ODEditConfig"
        for name in ("alpha", "beta", "lambda_init", "lambda_lr", "dual_slack"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{where}.{name} must be a number >= 0, got {value!r}")
            setattr(self, name, float(value))
        for name in ("loc_risk", "gen_risk", "irm_penalty", "gen_anchor_edit"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{where}.{name} must be True or False, got {getattr(self, name)!r}")
        self.rephrase_kinds = tuple(self.rephrase_kinds)
        bad = [k for k in self.rephrase_kinds if k not in REPHRASE_KINDS]
        if bad or len(set(self.rephrase_kinds)) != len(self.rephrase_kinds):
            raise ValueError(
                f"{where}.rephrase_kinds must be distinct names from {REPHRASE_KINDS}, got {self.rephrase_kinds}"
            )
        self.irm_environments = tuple(self.irm_environments)
        bad = [e for e in self.irm_environments if e not in IRM_ENVIRONMENTS]
        if bad or not self.irm_environments or len(set(self.irm_environments)) != len(self.irm_environments):
            raise ValueError(
                f"{where}.irm_environments must be distinct names from {IRM_ENVIRONMENTS}, got {self.irm_environments}"
            )
        if "neighbours" in self.irm_environments and self.irm_penalty and not self.rephrase_kinds:
            raise ValueError(f"{where}: the 'neighbours' IRM environment needs at least one rephrase kind")
        if self.gen_risk and not self.rephrase_kinds:
            raise ValueError(f"{where}: gen_risk=True needs at least one of rephrase_kinds={REPHRASE_KINDS}")
        for name, low in (("warmup_steps", 0), ("penalty_steps", 1), ("min_penalty_steps", 0)):
            value = getattr(self, name)
            if name == "warmup_steps" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{where}.{name} must be an int >= {low}, got {value!r}")
        if self.min_penalty_steps > self.penalty_steps:
            raise ValueError(
                f"{where}.min_penalty_steps={self.min_penalty_steps} exceeds penalty_steps={self.penalty_steps}; "
                "lower it or raise penalty_steps"
            )
        if self.stop_penalty is not None:
            if (
                isinstance(self.stop_penalty, bool)
                or not isinstance(self.stop_penalty, (int, float))
                or not self.stop_penalty > 0
                or self.stop_penalty == float("inf")
            ):
                raise ValueError(
                    f"{where}.stop_penalty must be a finite number > 0 or None, got {self.stop_penalty!r}"
                )
            self.stop_penalty = float(self.stop_penalty)
        for name in ("num_rephrases", "lambda_hidden_size", "sketch_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{where}.{name} must be an int >= 1, got {value!r}")
        if isinstance(self.sketch_seed, bool) or not isinstance(self.sketch_seed, int):
            raise ValueError(f"{where}.sketch_seed must be an int, got {self.sketch_seed!r}")
        for name, allowed in (
            ("gen_positions", GEN_POSITIONS),
            ("loc_positions", LOC_POSITIONS),
            ("lambda_mode", LAMBDA_MODES),
            ("lambda_param", LAMBDA_PARAMS),
            ("kernel_backend", KERNEL_BACKENDS),
            ("schedule", SCHEDULES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{where}.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        self.mmd_bandwidth_multipliers = tuple(float(m) for m in self.mmd_bandwidth_multipliers)
        if not self.mmd_bandwidth_multipliers or any(m <= 0 for m in self.mmd_bandwidth_multipliers):
            raise ValueError(
                f"{where}.mmd_bandwidth_multipliers must be a non-empty list of numbers > 0, "
                f"got {self.mmd_bandwidth_multipliers}"
            )
        if self.mmd_bandwidths is not None:
            self.mmd_bandwidths = tuple(float(s) for s in self.mmd_bandwidths)
            if not self.mmd_bandwidths or any(s <= 0 for s in self.mmd_bandwidths):
                raise ValueError(
                    f"{where}.mmd_bandwidths must be numbers > 0 (or None), got {self.mmd_bandwidths}"
                )
        if (
            self.lambda_param != "softplus"
            and self.lambda_mode != "fixed"
            and self.irm_penalty
            and not self.lambda_init > 0
        ):
            raise ValueError(
                f"{where}.lambda_param={self.lambda_param!r} scales lambda_init, which must then be > 0 (got "
                f"{self.lambda_init}); set lambda_param='softplus', or irm_penalty=False for no penalty"
            )
        if self.lambda_min is not None:
            if isinstance(self.lambda_min, bool) or not isinstance(self.lambda_min, (int, float)):
                raise ValueError(f"{where}.lambda_min must be a number or None, got {self.lambda_min!r}")
            self.lambda_min = float(self.lambda_min)
            if not 0 <= self.lambda_min <= self.lambda_init:
                raise ValueError(
                    f"{where}.lambda_min={self.lambda_min} must be between 0 and lambda_init={self.lambda_init}"
                )
        if self.lambda_max is not None:
            self.lambda_max = float(self.lambda_max)
            if self.lambda_max < self.lambda_init:
                raise ValueError(
                    f"{where}.lambda_max={self.lambda_max} is below lambda_init={self.lambda_init}; raise it or unset it"
                )
