"""SERAC tuner: routes every input between the base model and the counterfactual model.

:class:`SERACModel` registers a forward pre-hook and a forward hook (both with kwargs) on the wrapped
transformers model. When the active adapter's cache holds an edit, a forward runs as follows:

1. the base model's own forward on the caller's inputs (asked for ``output_hidden_states``); its hidden
   states ``hidden_states[cls_layer]`` -- the fused image + text states of the language model -- are
   pooled (``pooling``: the mean, or the last prompt position's state) over each row's prompt (its real tokens up to the last answer marker, so the target tokens
   of a teacher-forced row never choose the route; the markers are cached at the first edit);
2. the scope classifier scores each row against every cached edit (:meth:`~.layer.Embedding.similarity`);
   ``s`` is the best score, the edit reaching it is the row's context;
3. hard routing (inference): rows with ``s > threshold`` get the counterfactual model's logits, the others
   keep the base logits bit for bit. The counterfactual model is the base model with the low-rank deltas
   of :class:`~.layer.Linear` switched on and a copy head (a pointer over the cached text's tokens), fed
   ``[cached edit text ; query]`` -- the context tokens are
   inserted right after the row's BOS, before the prompt and its image placeholders, and the row keeps its
   own image (``pixel_values`` pass through): unlike EasyEdit's SERAC_MULTI, the counterfactual model sees
   the query's image through the backbone's own (trained) projector. Its logits are gathered back to the
   row's original positions, so callers see ``(B, T, V)`` for their own batch;
4. soft routing (training, ``SERACModel.soft = True``): the returned ``logits`` are
   ``log((1 - s) p_base + s p_cf)`` for every row (EasyEdit's ``supervised: False`` mixture); the base
   logits and the scores stay on the tuner (:attr:`SERACModel.last_base_logits`, :attr:`last_scores`).

With an empty cache, ``disable_adapter()``, or no SERAC adapter active, the forward is the base model's,
bit for bit. Only full teacher-forced forwards are routed (no ``inputs_embeds`` / KV cache); with ``labels``
the returned ``loss`` is the routed output's mean target NLL.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from odedit_hf.editing.tuner import EditorTuner
from odedit_hf.editors.ike.layer import unpad_row

from .config import SERACConfig
from .layer import CACHE_BUFFERS, NOT_MERGEABLE, Embedding, Linear, SERACLayer

logger = logging.getLogger(__name__)

__all__ = ["SERACModel", "pooled_features", "prefix_inputs"]

_PEFT_PREFIX = "base_model.model."
_SHIFTED = {"token_type_ids": 0, "mm_token_type_ids": 0}
_REFUSED = ("inputs_embeds", "position_ids", "past_key_values", "cache_position")


def _prompt_end(ids: Sequence[int], markers: Sequence[Sequence[int]]) -> int:
    """The end of the prompt part of a row: after the last occurrence of any marker (the row if none)."""
    best = -1
    for marker in markers:
        n = len(marker)
        for start in range(len(ids) - n, -1, -1):
            if list(ids[start : start + n]) == list(marker):
                best = max(best, start + n)
                break
    return best if best > 0 else len(ids)


def pooled_features(
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    markers: Sequence[Sequence[int]],
    pooling: str = "mean",
) -> torch.Tensor:
    """``(B, H)`` float32 features of ``hidden`` ``(B, T, H)`` over each row's prompt positions (its real
    tokens, image placeholders included, up to the last answer marker): their mean (``"mean"``) or the
    last one's state (``"last"``, the state that predicts the answer)."""
    weights = torch.zeros(input_ids.shape, dtype=torch.float32, device=hidden.device)
    for r in range(input_ids.shape[0]):
        real = mask[r].nonzero().flatten()
        if real.numel() == 0:
            continue
        cut = _prompt_end(input_ids[r, real].tolist(), markers)
        if pooling == "last":
            weights[r, real[cut - 1]] = 1.0
        else:
            weights[r, real[:cut]] = 1.0 / cut
    return torch.einsum("bt,bth->bh", weights, hidden.float())


def prefix_inputs(
    kwargs: dict[str, Any], contexts: Sequence[Sequence[int]], bos: int | None
) -> tuple[dict[str, Any], torch.Tensor, list[int]]:
    """The forward kwargs with each row's context tokens inserted right after its BOS, the ``(B, T)``
    index of the original positions in the new rows (for gathering the logits back) and where each row's
    context starts. Rows stay right-padded (``attention_mask`` 0), so real tokens keep positions
    ``0..n-1``."""
    input_ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(input_ids)
    batch, length = input_ids.shape
    device = input_ids.device
    inserts = []
    for r in range(batch):
        real = mask[r].nonzero().flatten()
        start = int(real[0]) if real.numel() else 0
        first = int(input_ids[r, start]) if real.numel() else None
        inserts.append(start + (1 if bos is not None and first == bos else 0))
    new_length = length + max(len(c) for c in contexts)
    pad = int(input_ids[0, -1]) if bool((mask[:, -1] == 0).any()) else 0
    shifted = {"input_ids": (input_ids, pad), "attention_mask": (mask, 0)}
    shifted.update(
        {
            n: (kwargs[n], fill)
            for n, fill in _SHIFTED.items()
            if isinstance(kwargs.get(n), torch.Tensor) and tuple(kwargs[n].shape) == (batch, length)
        }
    )
    new_kwargs = {k: v for k, v in kwargs.items() if k not in shifted and k != "labels"}
    outs = {n: t.new_full((batch, new_length), fill) for n, (t, fill) in shifted.items()}
    index = torch.empty(batch, length, dtype=torch.long, device=device)
    positions = torch.arange(length, device=device)
    for r, (ctx, at) in enumerate(zip(contexts, inserts)):
        n = len(ctx)
        for name, (t, _fill) in shifted.items():
            out = outs[name]
            out[r, :at] = t[r, :at]
            out[r, at + n : length + n] = t[r, at:]
            if name == "input_ids":
                out[r, at : at + n] = torch.as_tensor(list(ctx), dtype=t.dtype, device=device)
            elif name == "attention_mask":
                out[r, at : at + n] = 1
        index[r] = torch.where(positions < at, positions, positions + n)
    new_kwargs.update(outs)
    return new_kwargs, index, inserts


class SERACModel(EditorTuner, BaseTuner):
    """SERAC as a peft tuner: ``get_peft_model(model, SERACConfig(...))`` (see the module docstring).

    Merging raises (a routed cache is not a weight delta); ``unload()`` removes the hooks and the layers.

    Attributes:
        soft: route by the soft mixture (training) instead of the hard switch.
        last_scores: ``(B,)`` best scope score of every row of the last routed forward (``None`` when the
            last forward was not routed); differentiable w.r.t. the classifier in soft mode.
        last_routes: ``(B,)`` bool, the rows the last routed forward sent to the counterfactual model.
        last_base_logits: the base logits of the last routed forward (soft mode only).
        last_cf_logprobs: the counterfactual model's log-probabilities of every row of the last routed
            forward (soft mode only).
    """

    prefix: str = "serac_"
    tuner_layer_cls = SERACLayer
    target_module_mapping: dict[str, list[str]] = {}
    editor_label = "SERAC"
    config_cls = SERACConfig
    base_types = (nn.Embedding, nn.Linear)
    base_hint = "SERAC wraps the input embedding and linear layers"
    freeze_inactive = False

    def __init__(self, model: nn.Module, config: Any, adapter_name: str, **kwargs: Any) -> None:
        super().__init__(model, config, adapter_name, **kwargs)
        self.soft = False
        self.last_scores: torch.Tensor | None = None
        self.last_routes: torch.Tensor | None = None
        self.last_base_logits: torch.Tensor | None = None
        self.last_cf_logprobs: torch.Tensor | None = None
        self._pending: tuple[dict[str, Any], bool] | None = None
        self._bypassed = False
        self._hooks = [
            self.model.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
            self.model.register_forward_hook(self._post_hook, with_kwargs=True),
        ]

    # ------------------------------------------------------------------ peft plumbing
    def _new_layer(
        self, target: nn.Module, base: nn.Module, adapter_name: str, peft_config: PeftConfig, current_key: str
    ) -> nn.Module:
        if isinstance(base, nn.Linear):
            return Linear(target, adapter_name, peft_config)
        if current_key != peft_config.embedding_module:
            raise ValueError(
                f"SERAC target {current_key!r} is an embedding but not the configured embedding_module "
                f"{peft_config.embedding_module!r}"
            )
        return Embedding(target, adapter_name, peft_config)

    def _check_merge_allowed(self) -> None:
        raise ValueError(NOT_MERGEABLE)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for p in model.parameters():
            p.requires_grad_(False)  # nothing trains at edit time; the trainer picks its parameters

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any) -> nn.Module:
        for handle in getattr(self, "_hooks", []):
            handle.remove()
        self._hooks = []
        return super()._unload_and_optionally_merge(*args, **kwargs)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: PeftConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Resize the cache of ``adapter_name`` to the checkpoint's, then peft's remap."""
        for module_name, module in model.named_modules():
            if not isinstance(module, Embedding) or adapter_name not in module.serac_cache_ids:
                continue
            short = module_name.removeprefix(_PEFT_PREFIX)
            for name in dict.fromkeys((module_name, _PEFT_PREFIX + short, short)):
                found = {b: state_dict.get(f"{name}.{b}") for b in CACHE_BUFFERS}
                if all(v is not None for v in found.values()):
                    module.load_cache(
                        adapter_name, {b: torch.zeros(v.shape, dtype=v.dtype) for b, v in found.items()}
                    )
                    break
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)

    # ------------------------------------------------------------------ state
    def serac_embedding(self, adapter_name: str | None = None) -> tuple[Embedding | None, str | None]:
        """The cache layer and its active adapter (or ``adapter_name``), or ``(None, None)`` when SERAC is off
        (disabled, or no SERAC adapter active)."""
        for module in self.model.modules():
            if isinstance(module, Embedding):
                if module.disable_adapters:
                    return None, None
                names = [adapter_name] if adapter_name is not None else module.active_adapters
                for name in names:
                    if name in module.serac_cache_ids:
                        return module, name
                return None, None
        return None, None

    def counterfactual_layers(self) -> list[Linear]:
        return [m for m in self.model.modules() if isinstance(m, Linear)]

    @contextlib.contextmanager
    def bypass(self) -> Iterator[None]:
        """Forwards inside run the base model as is (no routing, deltas off)."""
        previous, self._bypassed = self._bypassed, True
        try:
            yield
        finally:
            self._bypassed = previous

    @contextlib.contextmanager
    def counterfactual(self) -> Iterator[None]:
        """Forwards inside run the counterfactual model (deltas on, no routing)."""
        layers = self.counterfactual_layers()
        with self.bypass():
            for layer in layers:
                layer.counterfactual_on = True
            try:
                yield
            finally:
                for layer in layers:
                    layer.counterfactual_on = False

    def _bos_id(self) -> int | None:
        config = self.model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        value = getattr(text, "bos_token_id", None)
        return None if value is None else int(value)

    def markers(self, layer: Embedding, adapter: str) -> list[list[int]]:
        return [unpad_row(row) for row in layer.serac_markers[adapter]]

    def base_features(self, adapter: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(B, H)`` pooled features of the base model's forward on ``inputs`` (no labels)."""
        layer, adapter = self.serac_embedding(adapter)
        if layer is None:
            raise ValueError(f"SERAC: adapter {adapter!r} is not active or is disabled")
        inputs = {k: v for k, v in inputs.items() if k != "labels"}
        with self.bypass(), torch.no_grad():
            out = self.model(**inputs, output_hidden_states=True)
        return self._features(layer, adapter, out.hidden_states, inputs)

    def _features(self, layer: Embedding, adapter: str, hidden: Any, kwargs: dict[str, Any]) -> torch.Tensor:
        input_ids = kwargs["input_ids"]
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(input_ids)
        states = hidden[layer.serac_cls_layer[adapter]]
        return pooled_features(
            states.detach(), input_ids, mask, self.markers(layer, adapter), layer.serac_pooling[adapter]
        )

    def counterfactual_logits(
        self, kwargs: dict[str, Any], contexts: Sequence[Sequence[int]], adapter: str | None = None
    ) -> torch.Tensor:
        """``(B, T, V)`` log-probabilities of the counterfactual model on ``[context ; row]`` at the rows' own
        positions: the delta-adapted model's softmax mixed with its copy head's distribution over the
        context's tokens (:meth:`~.layer.Embedding.copy_logprobs`)."""
        layer, adapter = self.serac_embedding(adapter)
        if layer is None:
            raise ValueError("SERAC: no active SERAC adapter for the counterfactual model")
        new_kwargs, index, starts = prefix_inputs(kwargs, contexts, self._bos_id())
        new_kwargs["output_hidden_states"] = True
        with self.counterfactual():
            out = self.model(**new_kwargs)
        device = out.logits.device
        index = index.to(device)

        def gather(t: torch.Tensor) -> torch.Tensor:
            return t.gather(1, index.unsqueeze(-1).expand(-1, -1, t.shape[-1]))

        hidden = out.hidden_states[-1]
        width = max(len(c) for c in contexts)
        span = torch.arange(width, device=device)
        lengths = torch.tensor([len(c) for c in contexts], device=device)
        key_mask = span[None, :] < lengths[:, None]
        key_pos = (torch.tensor(starts, device=device)[:, None] + span[None, :]).clamp_max(
            hidden.shape[1] - 1
        )
        keys = hidden.gather(1, key_pos.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        key_ids = new_kwargs["input_ids"].to(device).gather(1, key_pos).masked_fill(~key_mask, 0)
        return layer.copy_logprobs(adapter, gather(out.logits), gather(hidden), keys, key_ids, key_mask)

    # ------------------------------------------------------------------ hooks
    def _pre_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self._pending = None
        if self._bypassed:
            return None
        layer, adapter = self.serac_embedding()
        if layer is None or layer.num_edits(adapter) == 0:
            return None
        kwargs = dict(kwargs)
        if args:
            if "input_ids" in kwargs or len(args) > 1:
                raise ValueError(
                    "SERAC: pass the model's inputs as keywords (input_ids=..., attention_mask=...)"
                )
            kwargs["input_ids"], args = args[0], ()
        for name in _REFUSED:
            if kwargs.get(name) is not None:
                raise ValueError(
                    f"SERAC routes full teacher-forced forwards; {name} is not supported (no inputs_embeds, "
                    "explicit positions or KV cache)"
                )
        input_ids = kwargs.get("input_ids")
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError("SERAC: the forward needs input_ids of shape (batch, length)")
        want_hidden = bool(kwargs.get("output_hidden_states"))
        self._pending = (dict(kwargs), want_hidden)
        kwargs["output_hidden_states"] = True
        return args, kwargs

    def _post_hook(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        call, want_hidden = pending
        if getattr(output, "logits", None) is None or getattr(output, "hidden_states", None) is None:
            raise ValueError("SERAC routes forwards that return a ModelOutput with logits (return_dict=True)")
        layer, adapter = self.serac_embedding()
        feats = self._features(layer, adapter, output.hidden_states, call)
        sims = layer.similarity(adapter, feats, layer.serac_cache_feat[adapter])
        scores, best = sims.max(dim=-1)
        cache_ids = layer.serac_cache_ids[adapter]
        contexts = [unpad_row(cache_ids[i]) for i in best.tolist()]
        base_logits = output.logits
        if self.soft:
            cf = self.counterfactual_logits(call, contexts, adapter)
            s = scores.clamp(1e-6, 1 - 1e-6).to(torch.float32)[:, None, None]
            mixed = torch.logaddexp(
                torch.log1p(-s) + torch.log_softmax(base_logits.float(), -1),
                torch.log(s) + cf,
            )
            self.last_base_logits = base_logits
            self.last_cf_logprobs = cf
            self.last_routes = scores.detach() > layer.serac_threshold[adapter]
            output["logits"] = mixed
        else:
            routes = scores > layer.serac_threshold[adapter]
            self.last_base_logits = None
            self.last_routes = routes.detach()
            if bool(routes.any()):
                cf = self.counterfactual_logits(call, contexts, adapter)
                output["logits"] = torch.where(
                    routes[:, None, None].to(cf.device), cf.to(base_logits.dtype), base_logits
                )
        self.last_scores = scores
        labels = call.get("labels")
        if isinstance(labels, torch.Tensor) and getattr(output, "loss", None) is not None:
            from odedit_hf.editing.loss import nll_from_logits

            output["loss"] = nll_from_logits(
                output.logits, labels
            )  # the routed output's loss, not the base's
        if not want_hidden:
            output["hidden_states"] = None
        return output
