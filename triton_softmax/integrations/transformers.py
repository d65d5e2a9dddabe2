"""One call puts :func:`triton_softmax.linear_cross_entropy` into a Hugging Face causal LM.

``patch(model)`` replaces the forward of one ``*ForCausalLM`` instance (the class is left
alone): called with ``labels``, it runs the base model, then takes the loss straight from the
hidden states and ``lm_head.weight`` with the fused linear cross-entropy, so the (tokens x vocab)
logits, their float32 copy and their gradient are never held. HF's own loss semantics are kept:
the label shift (or ``shift_labels`` when given), ``ignore_index`` (-100), ``num_items_in_batch``
(summed, then divided, for gradient accumulation), ``logits_to_keep`` and the config's
``final_logit_softcapping`` (Gemma 2/3). With labels the output's ``logits`` is None. Without
labels the original forward runs untouched (generation, evaluation without labels).

TRL: ``SFTTrainer`` (TRL >= 1.x) installs its own fused LM head on the model it builds and calls
``model(..., fused_lm_head=True)``, which bypasses any forward patched before it. Patch the
trainer's model after building the trainer (``patch(trainer.model)``): the patched forward then
serves those calls too, returning TRL's per-token fields (``log_probs``, ``label_mask``, and the
``entropy`` / ``is_top1`` behind its logged ``entropy`` and ``mean_token_accuracy``) computed
from our kernels. See :func:`patch` for what the two metrics cost.

Importing this module imports transformers; ``import triton_softmax`` does not import it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.modeling_outputs import CausalLMOutputWithPast

from triton_softmax.functional import linear_cross_entropy

__all__ = ["SUPPORTED_MODELS", "patch", "unpatch", "patched", "is_patched"]

#: The classes whose forward was read and mirrored (transformers 5.x): base model in
#: ``model.model``, ``lm_head`` an ``nn.Linear``, logits = lm_head(hidden) (then the config's
#: final_logit_softcapping for Gemma 2/3), loss = ``ForCausalLMLoss``. A model class outside this
#: list, or a subclass that overrides ``forward``, is refused: its forward may scale the logits
#: (Cohere, Granite) or compute the loss differently, which a patch would silently drop.
SUPPORTED_MODELS = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "Phi3ForCausalLM": "phi3",
}

#: The attribute of a patched model instance holding its :class:`_Patch`.
_STATE = "_triton_softmax_patch"

#: Arguments of ``linear_cross_entropy`` that the patch sets from the model and HF's loss
#: semantics; ``loss_options`` may not set them (softcap only where the config has none).
_RESERVED = {
    "input",
    "linear_weight",
    "target",
    "linear_bias",
    "reduction",
    "ignore_index",
    "return_lse",
    "return_entropy",
    "process_group",
}

#: Logits per chunk of the no-grad pass behind TRL's entropy and token accuracy (8 MiB fp32),
#: the chunk size of the library's CPU path.
_METRIC_CHUNK_LOGITS = 1 << 21


@dataclasses.dataclass
class _Patch:
    """What a patched instance needs at call time; deep-copied with the model."""

    original: object  # the bound forward that ran before patch()
    had_instance_forward: bool  # whether that forward lived in the instance's __dict__
    softcap: float | None
    options: dict
    token_metrics: bool


def _find_supported_class(model) -> type | None:
    for cls in type(model).__mro__:
        module = SUPPORTED_MODELS.get(cls.__name__)
        if module and cls.__module__ == f"transformers.models.{module}.modeling_{module}":
            return cls
    return None


def _check_layout(model) -> None:
    """One-line ValueError naming the class and what is missing, or None for a known layout."""
    name = type(model).__name__
    cls = _find_supported_class(model)
    if cls is None:
        raise ValueError(
            f"triton_softmax patch: {name} is not a supported causal LM (supported: "
            f"{', '.join(SUPPORTED_MODELS)}; their forward was read and mirrored)"
        )
    if type(model).forward is not cls.forward:
        raise ValueError(
            f"triton_softmax patch: {name} overrides {cls.__name__}.forward, which the patch "
            "would replace"
        )
    if not isinstance(getattr(model, "model", None), torch.nn.Module):
        raise ValueError(f"triton_softmax patch: {name} has no base model in `model.model`")
    head = getattr(model, "lm_head", None)
    if type(head) is not torch.nn.Linear:
        raise ValueError(
            f"triton_softmax patch: {name}.lm_head is {type(head).__name__}, not a plain "
            "torch.nn.Linear (an adapter or quantised head would be bypassed)"
        )
    if model.loss_function is not ForCausalLMLoss:
        raise ValueError(
            f"triton_softmax patch: {name}.loss_function is not transformers' ForCausalLMLoss "
            f"(loss_type={getattr(model, 'loss_type', None)!r} or a custom loss_function)"
        )


def patch(model, *, token_metrics: bool = True, **loss_options):
    """Make ``model`` compute its training loss with the fused linear cross-entropy.

    Args:
        model: a transformers ``*ForCausalLM`` instance of a class in :data:`SUPPORTED_MODELS`
            (Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, Gemma 3 text, Phi-3). Only this
            instance changes: its ``forward`` is replaced; :func:`unpatch` restores it.
        token_metrics: for TRL's ``fused_lm_head=True`` calls only: compute the per-token
            ``entropy`` and ``is_top1`` (TRL logs them as ``entropy`` and
            ``mean_token_accuracy``) in one extra no-grad pass over the head, chunked to 2M
            logits at a time, over the non-ignored tokens: about one more forward matmul of
            the head per step, never the full logits. False: skip that pass; both fields are
            NaN, so TRL logs NaN for the two metrics.
        **loss_options: passed to :func:`triton_softmax.linear_cross_entropy`:
            ``label_smoothing``, ``z_loss``, ``weight`` (class weights), ``softcap`` (only for a
            config without ``final_logit_softcapping``), ``options``. The patch sets
            ``reduction``, ``ignore_index``, the bias and the softcap from the config itself.

    Returns:
        The same ``model``, patched: called with ``labels`` it returns a
        ``CausalLMOutputWithPast`` (or its tuple for ``return_dict=False``) whose ``loss`` is
        HF's loss (float32) and whose ``logits`` is None; without labels, the original forward.

    Raises:
        ValueError: an unsupported model (one line naming the class and what was missing), a
            model already patched, an option the patch sets itself or does not know, or a
            ``softcap`` that conflicts with the config's ``final_logit_softcapping``.
    """
    _check_layout(model)
    name = type(model).__name__
    if _STATE in vars(model):
        raise ValueError(f"triton_softmax patch: this {name} is already patched; unpatch it first")
    known = set(inspect.signature(linear_cross_entropy).parameters) - _RESERVED
    unknown = sorted(set(loss_options) - known)
    if unknown:
        raise ValueError(
            f"triton_softmax patch: loss option(s) {unknown} not accepted (the patch sets "
            f"{sorted(_RESERVED)} itself; options: {sorted(known)})"
        )
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if "softcap" in loss_options:
        if softcap is not None and loss_options["softcap"] != softcap:
            raise ValueError(
                f"triton_softmax patch: softcap={loss_options['softcap']} but {name}'s config "
                f"has final_logit_softcapping={softcap}, which its forward applies"
            )
        softcap = loss_options.pop("softcap")

    @functools.wraps(type(model).forward)  # generate() and Trainer read the signature
    def forward(self, *args, **kwargs):
        return _patched_forward(self, *args, **kwargs)

    forward._triton_softmax_patch = True  # tells unpatch() the forward is still ours
    state = _Patch(
        original=model.forward,
        had_instance_forward="forward" in vars(model),
        softcap=softcap,
        options=dict(loss_options),
        token_metrics=token_metrics,
    )
    # nn.Module.__setattr__ keeps plain objects in the instance's __dict__.
    setattr(model, _STATE, state)
    model.forward = types.MethodType(forward, model)
    return model


def is_patched(model) -> bool:
    """Whether :func:`patch` was applied to this instance (and not undone).

    Args:
        model: any ``torch.nn.Module``.
    Returns:
        True when the instance carries a patch.
    """
    return _STATE in vars(model)


def unpatch(model):
    """Restore the forward ``model`` had before :func:`patch`.

    Args:
        model: a model patched by :func:`patch`.
    Returns:
        The same ``model``, unpatched.
    Raises:
        ValueError: the model is not patched.
        RuntimeError: ``model.forward`` was replaced after :func:`patch` (e.g. TRL's
            ``SFTTrainer`` wrapped it): restoring would drop that wrapper.
    """
    state = vars(model).get(_STATE)
    if state is None:
        raise ValueError(f"triton_softmax unpatch: this {type(model).__name__} is not patched")
    current = vars(model).get("forward")
    if getattr(current, "__self__", None) is not model or not hasattr(
        getattr(current, "__func__", None), _STATE
    ):
        raise RuntimeError(
            f"triton_softmax unpatch: {type(model).__name__}.forward was replaced after patch(); "
            "unpatch would drop that wrapper"
        )
    if state.had_instance_forward:
        model.forward = state.original
    else:
        del model.forward
    delattr(model, _STATE)
    return model


@contextlib.contextmanager
def patched(model, **patch_options) -> Iterator:
    """Context manager: ``model`` patched inside the block, restored on exit.

    Args:
        model: as :func:`patch`.
        **patch_options: :func:`patch`'s keywords (``token_metrics`` and the loss options).
    Returns:
        A context manager that yields the patched model.
    """
    patch(model, **patch_options)
    try:
        yield model
    finally:
        unpatch(model)


def _slice_to_keep(hidden: torch.Tensor, logits_to_keep) -> torch.Tensor:
    """transformers' slice_logits_to_keep: the positions whose logits the forward computes."""
    if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.ndim == 2:
        if logits_to_keep.dtype == torch.bool:
            return hidden[logits_to_keep]
        return torch.take_along_dim(hidden, logits_to_keep[..., None], dim=1)
    if isinstance(logits_to_keep, int):
        logits_to_keep = slice(-logits_to_keep, None)  # 0 keeps every position
    return hidden[:, logits_to_keep, :]


def _head(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``lm_head``'s weight and bias, looked up per call (FSDP and PEFT may replace modules)."""
    _check_layout(model)
    return model.lm_head.weight, model.lm_head.bias


def _patched_forward(self, *args, **kwargs):
    state: _Patch = vars(self)[_STATE]
    fused = kwargs.pop("fused_lm_head", False)
    bound = inspect.signature(type(self).forward).bind(self, *args, **kwargs)
    arguments = dict(bound.arguments)
    arguments.pop("self")
    var_keyword = next(
        (p.name for p in bound.signature.parameters.values() if p.kind is p.VAR_KEYWORD), None
    )
    extra = dict(arguments.pop(var_keyword, {})) if var_keyword else {}
    if fused:
        return _trl_fused_forward(self, state, arguments, extra)
    if arguments.get("labels") is None:
        return state.original(*args, **kwargs)

    labels = arguments.pop("labels")
    logits_to_keep = arguments.pop("logits_to_keep", 0)
    # transformers' can_return_tuple: return_dict is consumed here, else the config's value.
    return_dict = extra.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    # As the original forward: every other argument, the loss kwargs included, reaches the base.
    outputs = self.model(**arguments, **extra)
    hidden = _slice_to_keep(outputs.last_hidden_state, logits_to_keep)
    loss = _causal_lm_loss(
        self,
        state,
        hidden,
        labels,
        num_items_in_batch=extra.get("num_items_in_batch"),
        ignore_index=extra.get("ignore_index", -100),
        shift_labels=extra.get("shift_labels"),
    )
    output = CausalLMOutputWithPast(
        loss=loss,
        logits=None,
        hidden_states=outputs.hidden_states,
        attentions=outputs.attentions,
        **_cache_field(outputs),
    )
    return output if return_dict else output.to_tuple()


def _cache_field(outputs) -> dict:
    """The base model's cache under the output class's field name (``cache`` in
    transformers >= 5.x, ``past_key_values`` before)."""
    names = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    name = "cache" if "cache" in names else "past_key_values"
    return {name: getattr(outputs, name, None)}


def _causal_lm_loss(
    model, state: _Patch, hidden, labels, *, num_items_in_batch, ignore_index, shift_labels
):
    """transformers' ForCausalLMLoss on ``lm_head(hidden)`` without the logits: labels shifted
    left by one (the last position padded with ``ignore_index``) unless ``shift_labels`` is
    given; "mean" over counted tokens, or "sum" divided by ``num_items_in_batch``; float32."""
    weight, bias = _head(model)
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden.device)
    rows = hidden.reshape(-1, hidden.shape[-1])
    if rows.shape[0] != targets.numel():
        raise ValueError(
            f"triton_softmax patch: {targets.numel()} shifted labels for {rows.shape[0]} "
            "positions (logits_to_keep leaves fewer positions than labels: pass shift_labels "
            "for the kept positions)"
        )
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = linear_cross_entropy(
        rows,
        weight,
        targets,
        linear_bias=bias,
        reduction=reduction,
        ignore_index=ignore_index,
        softcap=state.softcap,
        **state.options,
    )
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    # HF's loss is float32 whatever the model's dtype; cast last, so that a float64 model's
    # gradients are not scaled by a float32-rounded 1 / num_items_in_batch.
    return loss.float()


def _trl_fused_forward(model, state: _Patch, arguments: dict, extra: dict):
    """TRL's ``fused_lm_head=True`` contract (trl.trainer.utils.add_fused_lm_head): per-token
    log-probabilities of the next-token labels, zero where the label is -100, and the loss
    ``-sum(log_probs) / (num_items_in_batch or the count of counted labels, at least 1)``."""
    from trl.trainer.utils import FusedCausalLMOutput

    if state.options:
        raise ValueError(
            f"triton_softmax patch: loss options {sorted(state.options)} would change the "
            "log-probabilities TRL's fused_lm_head=True asks for; patch without them"
        )
    labels = arguments.pop("labels", None)
    shift_labels = extra.pop("shift_labels", None)
    num_items_in_batch = extra.pop("num_items_in_batch", None)
    logits_to_keep = arguments.pop("logits_to_keep", 0)
    extra.pop("return_dict", None)
    if labels is None and shift_labels is None:
        raise ValueError("triton_softmax patch: fused_lm_head=True needs labels")
    if not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
        raise ValueError("triton_softmax patch: fused_lm_head=True scores every position")
    arguments["use_cache"] = False
    hidden = model.model(**arguments, **extra).last_hidden_state
    if shift_labels is None:
        hidden, targets = hidden[:, :-1], labels[:, 1:]
    else:
        targets = shift_labels
    weight, bias = _head(model)
    targets = targets.to(hidden.device)
    mask = targets != -100
    rows = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    nll = linear_cross_entropy(
        rows,
        weight,
        flat_targets,
        linear_bias=bias,
        reduction="none",
        ignore_index=-100,
        softcap=state.softcap,
    )
    log_probs = -nll.float().view(mask.shape)  # zero where ignored, as the kernels leave it
    count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    loss = -log_probs.sum() / count
    if state.token_metrics:
        entropy, is_top1 = _entropy_and_top1(rows, weight, bias, flat_targets, state.softcap)
        entropy, is_top1 = entropy.view(mask.shape), is_top1.view(mask.shape)
    else:
        entropy = torch.full(mask.shape, math.nan, device=hidden.device)
        is_top1 = torch.full(mask.shape, math.nan, device=hidden.device)
    return FusedCausalLMOutput(
        loss=loss,
        log_probs=log_probs,
        entropy=entropy,
        is_top1=is_top1,
        label_mask=mask,
    )


@torch.no_grad()
def _entropy_and_top1(rows, weight, bias, targets, softcap):
    """Entropy of the next-token distribution and whether the label is its argmax, for the
    rows whose target is not -100 (zero / False elsewhere), in chunks of at most
    ``_METRIC_CHUNK_LOGITS`` float32 logits: never the full logits."""
    entropy = torch.zeros(targets.shape, dtype=torch.float32, device=rows.device)
    is_top1 = torch.zeros(targets.shape, dtype=torch.bool, device=rows.device)
    counted = (targets != -100).nonzero().squeeze(1)
    step = max(1, _METRIC_CHUNK_LOGITS // weight.shape[0])
    for start in range(0, counted.numel(), step):
        index = counted[start : start + step]
        logits = F.linear(rows[index], weight, bias).float()
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        log_p = torch.log_softmax(logits, dim=-1)
        entropy[index] = -(log_p.exp() * log_p).sum(-1)
        is_top1[index] = logits.argmax(-1) == targets[index]
    return entropy, is_top1
