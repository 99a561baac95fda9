"""Causal language models from Hugging Face ``transformers``, with smskd taps.

:class:`CausalLM` wraps a ``transformers`` causal LM (a ``PreTrainedModel``, kept
untouched as the child ``lm``) so that it is an ordinary smskd model:
``model(input_ids)`` takes token ids ``[B, T]`` and returns the logits ``[B, T, V]``
as a plain tensor, and its activations are child modules that
:class:`~smskd.models.taps.FeatureTaps` taps by name:

* ``hidden.i``: decoder layer ``i``'s output hidden states ``[B, T, D]`` (the
  residual stream; the last one is *before* the final norm, so ``hidden.i`` is
  ``transformers``' ``output_hidden_states[i + 1]`` except for the last layer);
* ``attention.i``: layer ``i``'s attention probabilities ``[B, H, T, T]`` (softmax
  over keys, causal: row ``t`` is 0 after column ``t``);
* ``values.i``: layer ``i``'s value vectors ``[B, H, T, d]``, one per *query* head:
  grouped-query key/value heads are repeated as the attention repeats them, so that
  ``attention.i @ values.i`` is exactly what each head mixes;
* ``lm.lm_head:input``: the final-norm output that the LM head reads ``[B, T, D]``
  (the ``embedding`` role).

Each tap point is an ``nn.Identity`` that forward hooks inside :class:`CausalLM`
call with the tensor as ``transformers`` computes it; the identities have no
weights, so ``state_dict`` is the wrapped model's, under ``lm.``. The hooks bind
their identity with ``functools.partial``, so a ``copy.deepcopy`` of the model (the
stage loop's reference copy) feeds its own identities, not the original's.

Choices, and why:

* Attention is ``"eager"`` while an ``attention.i`` tap is hooked (the MiniLM
  method needs the probabilities, which SDPA never materialises) and ``"sdpa"``
  otherwise: eager attention is slower (a plain distillation step 1.20× a plain
  loop with SDPA, 1.05× one with eager: benchmarks/lm_throughput.py) and uses O(T²)
  memory per head. The choice is made per forward, from the hooks alone.
* Dropout (residual, embedding, attention) is 0 in the builders unless given:
  ``GPT2Config`` defaults to 0.1, and the attention probabilities that eager
  attention returns in training mode are the ones *after* dropout, which no
  distillation loss wants to match.
* No attention mask: sequences are padded on the right and attention is causal, so
  no valid position ever attends to a later padding token; the logits at padding
  positions are garbage that the loss must ignore (its label mask does that).
* ``use_cache=False``: training and scoring see whole sequences; no KV cache.
* Only GPT-2 and LLaMA checkpoints are accepted: their hooks are written against
  those modules (checked with ``transformers`` 5.25). Another ``model_type`` is
  refused in one line rather than built with taps that silently capture nothing.

``transformers`` is imported only when a builder runs, so ``import smskd`` stays
fast and works without it (``pip install 'smskd[lm]'``).
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from smskd.errors import UserError, choices
from smskd.models.taps import ModelLayout

INSTALL_HINT = "pip install 'smskd[lm]'"


class CausalLM(nn.Module):
    """A ``transformers`` causal LM as an smskd model: token ids in, logits out, taps.

    ``lm`` is a GPT-2 or LLaMA ``PreTrainedModel`` with an LM head (e.g.
    ``GPT2LMHeadModel``, ``LlamaForCausalLM``); its attention runs eager while its
    attention is tapped, SDPA otherwise.
    See the module docstring for the taps. ``max_positions`` is the context length
    the model supports; longer inputs are refused.
    """

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        config = lm.config
        model_type = getattr(config, "model_type", None)
        if model_type not in _ARCHITECTURES:
            raise ValueError(
                f"no smskd taps for model_type {model_type!r}; supported: {choices(_ARCHITECTURES)}"
            )
        architecture = _ARCHITECTURES[model_type]
        self.lm = lm
        layers = architecture.layers(lm)
        self.hidden = nn.ModuleList(nn.Identity() for _ in layers)
        self.attention = nn.ModuleList(nn.Identity() for _ in layers)
        self.values = nn.ModuleList(nn.Identity() for _ in layers)
        for i, layer in enumerate(layers):
            attention = architecture.attention(layer)
            layer.register_forward_hook(functools.partial(_emit_hidden, self.hidden[i]))
            attention.register_forward_hook(functools.partial(_emit_attention, self.attention[i]))
            source, emit_values = architecture.values(attention)
            source.register_forward_hook(functools.partial(emit_values, self.values[i], attention))
        count = len(layers)
        self.tap_layout = ModelLayout(
            features=tuple(f"hidden.{i}" for i in range(count)),
            embedding="lm.lm_head:input",
            attention=tuple(f"attention.{i}" for i in range(count)),
            values=tuple(f"values.{i}" for i in range(count)),
        )
        self.max_positions = int(config.max_position_embeddings)

    def forward(self, input_ids: Tensor) -> Tensor:
        """Token ids ``[B, T]`` (padded on the right, no mask needed) → logits ``[B, T, V]``."""
        length = input_ids.shape[-1]
        if length > self.max_positions:
            raise UserError(
                f"sequences of {length} tokens exceed the model's context of "
                f"{self.max_positions} positions; use shorter sequences or a model with more "
                "positions (n_positions / max_position_embeddings)"
            )
        tapped = any(tap._forward_hooks for tap in self.attention)
        config = self.lm.config
        dropout = getattr(config, "attn_pdrop", 0.0) or getattr(config, "attention_dropout", 0.0)
        if tapped and self.training and dropout:
            # Eager attention returns the probabilities after dropout: zeros and 1/(1−p)
            # scaling that no attention loss should match.
            raise UserError(
                f"the model's attention dropout is {dropout}, and its attention is matched "
                "(lm-attention): set it to 0 (kwargs attn_pdrop: 0 for gpt2, "
                "attention_dropout: 0 for llama; for hf-pretrained, save the model so)"
            )
        wanted = "eager" if tapped else "sdpa"
        if config._attn_implementation != wanted:
            self.lm.set_attn_implementation(wanted)
        return self.lm(input_ids=input_ids, use_cache=False, return_dict=True).logits

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the wrapped model (config and safetensors weights) to ``directory``, for
        ``transformers.AutoModelForCausalLM.from_pretrained`` or ``hf-pretrained``."""
        self.lm.save_pretrained(str(directory))


# --- hooks: each calls its tap point (an nn.Identity) so that the tap's hooks fire ---


def _emit_hidden(tap: nn.Module, _module: nn.Module, _inputs: tuple, output: Any) -> None:
    # A decoder layer returns a tensor in transformers 5, a tuple (hidden, ...) in 4.x.
    tap(output[0] if isinstance(output, tuple) else output)


def _emit_attention(tap: nn.Module, _module: nn.Module, _inputs: tuple, output: Any) -> None:
    # Attention modules return (attn_output, attn_weights, ...); weights are None
    # unless attention is eager.
    if not tap._forward_hooks:
        return  # not tapped: attention may be SDPA, which gives no probabilities
    weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
    if weights is None:
        raise RuntimeError(
            "attention probabilities are None: CausalLM needs attn_implementation='eager' "
            "(was the wrapped model switched to another implementation?)"
        )
    tap(weights)


def _emit_gpt2_values(tap: nn.Module, attention: nn.Module, _module: nn.Module, _inputs, output):
    # GPT-2's c_attn projects to [B, T, 3·D] = query | key | value (GPT2Attention.forward).
    width = attention.split_size
    values = output[..., 2 * width : 3 * width]
    tap(values.unflatten(-1, (-1, attention.head_dim)).transpose(1, 2))


def _emit_llama_values(tap: nn.Module, attention: nn.Module, _module: nn.Module, _inputs, output):
    # v_proj gives [B, T, Hkv·d]; query head h reads kv head h // groups (repeat_kv).
    values = output.unflatten(-1, (-1, attention.head_dim)).transpose(1, 2)
    groups = attention.num_key_value_groups
    tap(values.repeat_interleave(groups, dim=1) if groups > 1 else values)


@dataclass(frozen=True)
class _Architecture:
    layers: Callable[[nn.Module], nn.ModuleList]
    attention: Callable[[nn.Module], nn.Module]
    values: Callable[[nn.Module], tuple[nn.Module, Callable[..., None]]]


_ARCHITECTURES: dict[str, _Architecture] = {
    "gpt2": _Architecture(
        layers=lambda lm: lm.transformer.h,
        attention=lambda layer: layer.attn,
        values=lambda attention: (attention.c_attn, _emit_gpt2_values),
    ),
    "llama": _Architecture(
        layers=lambda lm: lm.model.layers,
        attention=lambda layer: layer.self_attn,
        values=lambda attention: (attention.v_proj, _emit_llama_values),
    ),
}


# --- builders ---------------------------------------------------------------------

_NO_DROPOUT = {
    "gpt2": {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
    "llama": {"attention_dropout": 0.0},
}
# Set by the builder or by CausalLM (the rest of PreTrainedConfig's generic keys are
# refused too), or only read by model heads that are not built here.
_NOT_SETTABLE = frozenset({"vocab_size", "use_cache"})
_OTHER_HEADS = ("summary_",)  # GPT2DoubleHeadsModel's multiple-choice head


def check_available(name: str) -> None:
    """Raise ValueError (config validation) when ``transformers`` is not installed."""
    if importlib.util.find_spec("transformers") is None:
        raise ValueError(f"model {name!r} needs transformers: {INSTALL_HINT}")


def _transformers(name: str) -> Any:
    try:
        import transformers
    except ImportError:
        raise UserError(f"model {name!r} needs transformers: {INSTALL_HINT}") from None
    return transformers


def _make_config(
    transformers: Any, config_class: type, given: dict[str, Any], defaults: dict[str, Any]
) -> Any:
    """``config_class(**defaults, **given)``; keys the class does not know are refused
    (``transformers`` configs keep unknown keys as attributes, so typos pass silently)."""
    # Aliases (GPT-2's hidden_size for n_embd) are refused: they would race the canonical key.
    generic = set(transformers.PreTrainedConfig().to_dict())
    known = {
        key
        for key in set(config_class().to_dict()) - generic - _NOT_SETTABLE
        if not key.startswith(_OTHER_HEADS)
    }
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(
            f"unknown {config_class.__name__} key(s) {', '.join(map(repr, unknown))}; "
            f"valid: {choices(known)}"
        )
    try:
        return config_class(**{**defaults, **given})
    except Exception as err:  # also huggingface_hub's StrictDataclassError, multi-line
        raise ValueError(_last_line(err)) from None


def _last_line(err: BaseException) -> str:
    """The informative line of a multi-line library message (the last non-empty one)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def build_gpt2(
    num_classes: int,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 2,
    n_positions: int = 256,
    in_channels: int | None = None,
    **more_config: Any,
) -> CausalLM:
    """A randomly initialised GPT-2 (``GPT2LMHeadModel``) with a vocabulary of
    ``num_classes`` tokens. ``more_config``: any other ``GPT2Config`` key; dropouts
    default to 0 and ``bos``/``eos`` token ids to None (GPT-2's 50256 is outside a
    small vocabulary). ``in_channels`` is ignored: token inputs have no channels."""
    del in_channels
    transformers = _transformers("gpt2")
    config = _make_config(
        transformers,
        transformers.GPT2Config,
        {"n_layer": n_layer, "n_embd": n_embd, "n_head": n_head, "n_positions": n_positions}
        | more_config,
        {
            **_NO_DROPOUT["gpt2"],
            "vocab_size": num_classes,
            "bos_token_id": None,
            "eos_token_id": None,
        },
    )
    config._attn_implementation = "eager"
    return CausalLM(transformers.GPT2LMHeadModel(config))


def llama_intermediate_size(hidden_size: int, multiple_of: int = 256) -> int:
    """LLaMA's SwiGLU width: ⅔·4·hidden (three matrices with about the parameters of a
    4×hidden two-matrix MLP), rounded up to ``multiple_of`` (Touvron et al. 2023; 4096
    → 11008). For the small default hidden size 64 that is 256 = 4×hidden."""
    width = int(2 * 4 * hidden_size / 3)
    return multiple_of * -(-width // multiple_of)


def build_llama(
    num_classes: int,
    num_hidden_layers: int = 2,
    hidden_size: int = 64,
    num_attention_heads: int = 2,
    num_key_value_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 256,
    in_channels: int | None = None,
    **more_config: Any,
) -> CausalLM:
    """A randomly initialised LLaMA (``LlamaForCausalLM``) with a vocabulary of
    ``num_classes`` tokens. ``num_key_value_heads`` below ``num_attention_heads`` is
    grouped-query attention (default: as many as query heads); ``intermediate_size``
    defaults to :func:`llama_intermediate_size`. ``more_config``: any other
    ``LlamaConfig`` key; attention dropout defaults to 0. ``in_channels`` is ignored."""
    del in_channels
    transformers = _transformers("llama")
    given = {
        "num_hidden_layers": num_hidden_layers,
        "hidden_size": hidden_size,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads or num_attention_heads,
        "intermediate_size": intermediate_size or llama_intermediate_size(hidden_size),
        "max_position_embeddings": max_position_embeddings,
    }
    config = _make_config(
        transformers,
        transformers.LlamaConfig,
        given | more_config,
        {**_NO_DROPOUT["llama"], "vocab_size": num_classes},
    )
    config._attn_implementation = "eager"
    return CausalLM(transformers.LlamaForCausalLM(config))


def build_pretrained(num_classes: int, path: str | None = None) -> CausalLM:
    """A GPT-2 or LLaMA checkpoint from the local directory ``path`` (as written by
    ``save_pretrained``), in float32 with eager attention. Nothing is downloaded:
    ``path`` must be a directory on this machine, and loading is ``local_files_only``
    without remote code. Its vocabulary must have ``num_classes`` tokens, and every
    weight must be in the checkpoint (none left randomly initialised). The checkpoint's
    own dropout is kept (GPT-2's is 0.1): none acts on a teacher, which runs in eval
    mode, but a student trained from it drops attention probabilities in train mode."""
    if path is None:
        raise ValueError(
            "hf-pretrained needs kwargs {path: DIR}, DIR a directory written by save_pretrained"
        )
    if not Path(path).is_dir():
        raise ValueError(
            f"hf-pretrained path {str(path)!r} is not a local directory; this machine loads "
            "models only from disk: save one with save_pretrained and give its directory"
        )
    transformers = _transformers("hf-pretrained")
    local = {"local_files_only": True, "trust_remote_code": False}
    try:
        config = transformers.AutoConfig.from_pretrained(path, **local)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(
            f"hf-pretrained path {str(path)!r} holds no readable model config: {_last_line(err)}"
        ) from None
    if config.model_type not in _ARCHITECTURES:
        raise ValueError(
            f"hf-pretrained path {str(path)!r} holds a {config.model_type!r} model; "
            f"supported model types: {choices(_ARCHITECTURES)}"
        )
    if config.vocab_size != num_classes:
        raise ValueError(
            f"hf-pretrained model at {str(path)!r} has a vocabulary of {config.vocab_size} "
            f"tokens but the data has {num_classes}; use the data's tokenizer with this model"
        )
    try:
        lm, info = transformers.AutoModelForCausalLM.from_pretrained(
            path,
            attn_implementation="eager",
            dtype=torch.float32,
            output_loading_info=True,
            **local,
        )
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(
            f"hf-pretrained path {str(path)!r} cannot be loaded: {_last_line(err)}"
        ) from None
    missing = [*info.get("missing_keys", ()), *info.get("mismatched_keys", ())]
    if missing:
        raise ValueError(
            f"hf-pretrained path {str(path)!r} lacks {len(missing)} weight(s) of the model "
            f"(e.g. {sorted(map(str, missing))[0]!r}); they would be random"
        )
    return CausalLM(lm)


ZOO: dict[str, tuple[Callable[..., nn.Module], str]] = {
    "gpt2": (
        build_gpt2,
        "GPT-2 causal LM (transformers), small defaults: 2 layers, width 64, 2 heads, 256 tokens",
    ),
    "llama": (
        build_llama,
        "LLaMA causal LM (transformers), small defaults: 2 layers, width 64, 2 heads, 256 tokens",
    ),
    "hf-pretrained": (
        build_pretrained,
        "a saved GPT-2/LLaMA transformers model, from the local directory kwargs.path",
    ),
}
