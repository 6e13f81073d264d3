"""Checkpoint weights into a model's parameters, for every family: names mapped once, shapes checked.

A model's modules carry Hugging Face's names (``model.layers.3.self_attn...``),
so a checkpoint tensor goes to the module of the same name, except where the
model fuses projections: ``packed_modules_mapping`` maps a checkpoint leaf
(``q_proj``) to the fused module (``qkv_proj``) and its shard. Each module
that holds weights has ``load(param, tensor, shard)``, which takes its
tensor-parallel slice. Tensors of layers another pipeline stage holds are
skipped, and so are a tied LM head and rotary tables.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

from hawker.config import ModelConfig
from hawker.layers.linear import ColumnParallelLinear

if TYPE_CHECKING:
    from hawker.layers.embedding import ParallelLMHead
    from hawker.models.base import DecoderModel

# Modules that only some pipeline stages hold.
STAGE_MODULES = ("model.embed_tokens", "model.norm", "lm_head")


class CheckpointWeights(nn.Module):
    """``load_weights`` and ``check_weight_shapes`` for a causal LM whose modules carry HF names.

    Expects ``self.config`` (a ModelConfig), ``self.model`` (with ``layer_range``
    and ``embed_tokens``) and ``self.lm_head`` (None off the last stage).
    """

    # checkpoint projection name -> (fused module name, shard index)
    packed_modules_mapping: ClassVar[dict[str, tuple[str, int]]] = {}
    config: ModelConfig
    model: DecoderModel
    lm_head: ParallelLMHead | None

    def load_weights(self, weights: Iterable[tuple[str, Any]], require_all: bool = True) -> list[nn.Parameter]:
        """Load HF-named tensors (or lazy slices); returns the parameters written.

        ``require_all`` (loading a checkpoint) raises if a parameter is left
        unset; a weight update passes only the tensors that changed.
        """
        modules = dict(self.named_modules())
        loaded: set[str] = set()
        written: list[nn.Parameter] = []
        for name, tensor in weights:
            found = self._resolve(name, modules)
            if found is None:
                continue
            module, module_name, param, shard = found
            module.load(param, tensor, shard)
            loaded.add(f"{module_name}.{param}#{shard}")
            written.append(getattr(module, param))
        if require_all:
            self._check_all_loaded(loaded)
        return written

    def check_weight_shapes(self, shapes: Iterable[tuple[str, Sequence[int]]]) -> list[nn.Parameter]:
        """The parameters that tensors of these (name, shape) would write.

        Raises ValueError, naming the tensor, unless every one fits a parameter of this model.
        """
        modules = dict(self.named_modules())
        targets: list[nn.Parameter] = []
        for name, shape in shapes:
            found = self._resolve(name, modules)  # raises for a name this model does not have
            if found is None:
                continue  # one this model ignores (a tied LM head, rotary tables)
            module, _, param, shard = found
            # The whole tensor's shape, whatever slice of it this rank keeps.
            expected = module.checkpoint_shape(param, shard)
            if tuple(shape) != expected:
                raise ValueError(f"{name!r} has shape {list(shape)}; this model's is {list(expected)}")
            targets.append(getattr(module, param))
        return targets

    def _resolve(self, name: str, modules: dict[str, nn.Module]) -> tuple[Any, str, str, int] | None:
        """(module, its name, parameter, shard) that checkpoint tensor ``name`` fills; None if not on this rank."""
        target = self._target(name, modules)
        if target is None:
            return None
        module_name, param = target
        prefix, _, leaf = module_name.rpartition(".")
        shard = 0
        if leaf in self.packed_modules_mapping:
            fused, shard = self.packed_modules_mapping[leaf]
            module_name = f"{prefix}.{fused}"
        module = modules.get(module_name)
        if module is None or not hasattr(module, "load") or getattr(module, param, None) is None:
            raise ValueError(f"checkpoint tensor {name!r} does not match any parameter of {type(self).__name__}")
        return module, module_name, param, shard

    def _target(self, name: str, modules: dict[str, nn.Module]) -> tuple[str, str] | None:
        """(module, parameter) of this rank that a checkpoint tensor fills; None when nothing here uses it."""
        if "rotary_emb.inv_freq" in name:
            return None
        tied = self.config.tie_word_embeddings
        if name == "lm_head.weight" and tied:
            return None
        module_name, dot, param = name.rpartition(".")
        parts = module_name.split(".")
        if not dot or (parts[:2] == ["model", "layers"] and (len(parts) < 3 or not parts[2].isdigit())):
            raise ValueError(f"checkpoint tensor {name!r} does not match any parameter of {type(self).__name__}")
        if parts[:2] == ["model", "layers"] and int(parts[2]) not in self.model.layer_range:
            return None  # another pipeline stage's layer
        if module_name == "model.embed_tokens" and tied and self.model.embed_tokens is None:
            # A last stage without the embedding still needs it as its tied LM head.
            return None if self.lm_head is None else ("lm_head", param)
        if module_name in STAGE_MODULES and module_name not in modules:
            return None  # held by another pipeline stage
        return module_name, param

    def _check_all_loaded(self, loaded: set[str]) -> None:
        expected: set[str] = set()
        for name, module in self.named_modules():
            if not hasattr(module, "load"):
                continue
            if module is self.lm_head and self.config.tie_word_embeddings and self.model.embed_tokens is not None:
                continue  # the same tensor as the embedding
            shards = len(module.local_sizes) if isinstance(module, ColumnParallelLinear) else 1
            for param_name, _ in module.named_parameters(recurse=False):
                expected.update(f"{name}.{param_name}#{s}" for s in range(shards))
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensor(s), e.g. {missing[:5]}")
