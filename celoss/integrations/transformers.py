"""Hugging Face ``transformers`` causal LMs trained through :func:`celoss.linear_cross_entropy`.

The next-token loss is computed from the decoder's last hidden states and the output-embedding weight
in one fused call, so the (batch x seq, vocab) logits are never built::

    from celoss.integrations.transformers import patch
    patch(model)                                   # any *ForCausalLM, before or after .to(device)
    loss = model(input_ids, labels=labels).loss    # training mode: logits is None
    model.generate(...)                            # calls without labels run the original forward

or without patching anything: ``loss = causal_lm_loss(model, input_ids, labels, attention_mask=mask)``.

What is honoured: the ``labels`` convention (shifted by one inside, ``-100`` ignored, ``shift_labels``
and ``ignore_index`` if given), ``num_items_in_batch`` as passed by ``transformers.Trainer`` (the loss is
then the sum over the batch divided by it), the config's ``final_logit_softcapping`` (Gemma 2/3),
``logit_scale`` (Cohere) and ``logits_scaling`` (Granite), a bias on the head, autocast, tied embeddings,
and the standard Mixture-of-Experts load-balancing loss (``output_router_logits``).

Not supported: heads that are not a plain ``nn.Linear`` (quantized, LoRA on ``lm_head``) and models
whose forward does more to the logits than the transforms above; :func:`check` compares the patched
and the original loss on a random batch when in doubt.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import types
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

try:
    import transformers
    from transformers import modeling_outputs
    from transformers.utils import ModelOutput
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("celoss.integrations.transformers needs the `transformers` package: "
                      "pip install 'celoss[transformers]'") from exc

__all__ = ["HeadSpec", "lm_head_spec", "lm_loss_from_hidden_states", "causal_lm_loss", "patch", "unpatch",
           "is_patched", "check"]

# arguments of a *ForCausalLM forward that belong to the loss or the head, not to the decoder
_LOSS_KWARGS = ("num_items_in_batch", "shift_labels", "ignore_index")
_HEAD_KWARGS = ("labels", "logits_to_keep", "num_logits_to_keep", "return_dict")
_STATE = "_celoss_patch"


class HeadSpec(NamedTuple):
    """What the model's forward does after the decoder: ``softcap(logit_scale * (h @ weight.T + bias))``."""
    weight: Tensor
    bias: Optional[Tensor]
    logit_scale: float
    softcap: Optional[float]


def _text_config(model):
    config = model.config
    get = getattr(config, "get_text_config", None)
    if get is not None:
        try:
            return get(decoder=True)
        except TypeError:
            return get()
    return config


def lm_head_spec(model) -> HeadSpec:
    """Weight, bias, logit scale and soft cap of ``model``'s output head, from the standard model API."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"celoss: {type(model).__name__}.get_output_embeddings() returned None; "
                         "is this a *ForCausalLM model?")
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        raise TypeError(f"celoss: the output head of {type(model).__name__} is a {type(head).__name__}, not a "
                        "plain nn.Linear (quantized heads and adapters on lm_head are not supported)")
    config = _text_config(model)
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None:      # Cohere: logits * logit_scale
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:   # Granite: logits / logits_scaling
        scale /= float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3: cap * tanh(logits / cap)
    return HeadSpec(head.weight, head.bias, scale, None if softcap is None else float(softcap))


def _autocast_inputs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]):
    """Mirror what nn.Linear would see: the autocast dtype if autocast is on, else the weight's dtype."""
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    cast = (lambda t: t if t is None or t.dtype == dtype else t.to(dtype))
    return cast(hidden), cast(weight), cast(bias)


def lm_loss_from_hidden_states(model, hidden_states: Tensor, labels: Optional[Tensor] = None, *,
                               shift_labels: Optional[Tensor] = None, num_items_in_batch=None,
                               ignore_index: int = -100, **loss_kwargs) -> Tensor:
    """The causal-LM loss of ``model`` from its decoder's last hidden states ``(B, T, D)``.

    ``labels`` ``(B, T)`` follow the Hugging Face convention: position ``t`` is scored against
    ``labels[:, t + 1]`` and ``ignore_index`` labels don't count. Pass ``shift_labels`` instead for
    labels already aligned with the positions. The reduction is the mean over counted tokens, or the
    sum divided by ``num_items_in_batch`` when given (gradient accumulation in ``transformers.Trainer``).
    Extra keywords (``label_smoothing``, ``z_loss``, ``chunk_bytes``, ``backend``, ...) go to
    :func:`celoss.linear_cross_entropy`. Returns a float32 scalar.
    """
    if shift_labels is None and labels is None:
        raise ValueError("celoss: pass labels (or shift_labels)")
    spec = lm_head_spec(model)
    shift = shift_labels is None
    target = labels if shift else shift_labels
    if hidden_states.device != spec.weight.device:  # e.g. a model split across devices
        hidden_states = hidden_states.to(spec.weight.device)
    target = target.to(device=hidden_states.device, dtype=torch.long)
    hidden, weight, bias = _autocast_inputs(hidden_states, spec.weight, spec.bias)
    reduction = "mean" if num_items_in_batch is None else "sum"
    with torch.autocast(hidden.device.type, enabled=False):
        loss = _linear_cross_entropy()(hidden, weight, target, linear_bias=bias, reduction=reduction,
                                       ignore_index=ignore_index, logit_scale=spec.logit_scale,
                                       softcap=spec.softcap, shift=shift, **loss_kwargs)
    loss = loss.float()
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def _linear_cross_entropy():
    from ..linear_cross_entropy import linear_cross_entropy
    return linear_cross_entropy


# ---------------------------------------------------------------------------------------------------
# the fused forward


@functools.lru_cache(maxsize=None)
def _output_class(forward_fn):
    """The ModelOutput class a *ForCausalLM forward is annotated to return (None if unknown)."""
    try:
        annotation = inspect.signature(forward_fn, eval_str=True).return_annotation
    except Exception:  # unresolvable string annotations
        try:
            annotation = inspect.signature(forward_fn).return_annotation
        except (TypeError, ValueError):
            return None
    if isinstance(annotation, str):
        annotation = getattr(modeling_outputs, annotation.split(".")[-1].strip("'\" "), None)
    args = getattr(annotation, "__args__", None)  # Union[Tuple, CausalLMOutputWithPast] in older versions
    candidates = args if args else (annotation,)
    for cls in candidates:
        if isinstance(cls, type) and issubclass(cls, ModelOutput) and "logits" in _fields(cls):
            return cls
    return None


def _fields(cls):
    return {f.name for f in dataclasses.fields(cls)}


def _moe_aux_loss(model, decoder_out, attention_mask):
    """The standard load-balancing loss of transformers' MoE causal LMs (coefficient applied)."""
    fn = getattr(sys.modules.get(type(model).__module__), "load_balancing_loss_func", None)
    names = ("num_experts", "num_experts_per_tok", "router_aux_loss_coef")
    if fn is None or not all(hasattr(model, n) for n in names):
        raise NotImplementedError(f"celoss: don't know the router auxiliary loss of {type(model).__name__}; "
                                  "pass output_router_logits=False or call unpatch(model)")
    params = list(inspect.signature(fn).parameters)
    if len(params) < 4 or params[1:4] != ["num_experts", "top_k", "attention_mask"]:
        raise NotImplementedError(f"celoss: {type(model).__name__} has a non-standard load_balancing_loss_func; "
                                  "pass output_router_logits=False or call unpatch(model)")
    aux = fn(decoder_out.router_logits, model.num_experts, model.num_experts_per_tok, attention_mask)
    return aux, model.router_aux_loss_coef


def _fused_forward(model, arguments: dict, class_forward):
    """The *ForCausalLM forward for a call with labels, minus the logits. ``arguments``: the call's
    arguments by name (only those the caller passed)."""
    args = dict(arguments)
    labels = args.pop("labels", None)
    loss_kwargs = {k: args.pop(k) for k in _LOSS_KWARGS if k in args}
    return_dict = args.pop("return_dict", None)
    for name in _HEAD_KWARGS:
        args.pop(name, None)
    config = model.config
    router = args.get("output_router_logits")
    if router is None:
        router = bool(getattr(_text_config(model), "output_router_logits", False))
    if router:
        args["output_router_logits"] = True
    out = model.get_decoder()(**args, return_dict=True)
    hidden = out[0] if not hasattr(out, "last_hidden_state") else out.last_hidden_state
    loss = lm_loss_from_hidden_states(model, hidden, labels, **loss_kwargs)
    aux_loss = None
    if router and getattr(out, "router_logits", None) is not None:
        aux_loss, coef = _moe_aux_loss(model, out, args.get("attention_mask"))
        loss = loss + coef * aux_loss.to(loss.device)

    cls = _output_class(class_forward)
    if cls is None:
        cls = modeling_outputs.MoeCausalLMOutputWithPast if aux_loss is not None \
            else modeling_outputs.CausalLMOutputWithPast
    fields = _fields(cls)
    values = {k: v for k, v in out.items() if k in fields and k not in ("loss", "logits")}
    values.update(loss=loss, logits=None)
    if "aux_loss" in fields:
        values["aux_loss"] = aux_loss
    result = cls(**values)
    if return_dict is None:
        return_dict = getattr(config, "return_dict", True)
    return result if return_dict else result.to_tuple()


def _check_model(model):
    if not isinstance(model, transformers.PreTrainedModel):
        hint = " (for a PEFT model, patch model.get_base_model())" if hasattr(model, "get_base_model") else ""
        raise TypeError(f"celoss: expected a transformers PreTrainedModel, got {type(model).__name__}{hint}")
    lm_head_spec(model)  # raises for unsupported heads


def causal_lm_loss(model, input_ids: Optional[Tensor] = None, labels: Optional[Tensor] = None, *,
                   num_items_in_batch=None, ignore_index: int = -100, **model_kwargs) -> Tensor:
    """The loss ``model(input_ids, labels=labels, **model_kwargs).loss`` computes, without the logits.

    Runs ``model.get_decoder()`` on the inputs (``attention_mask``, ``position_ids``, ``inputs_embeds``,
    ... pass through) and :func:`lm_loss_from_hidden_states` on its output. Works on unpatched models.
    """
    _check_model(model)
    if labels is None:
        raise ValueError("celoss: causal_lm_loss needs labels")
    arguments = dict(model_kwargs, labels=labels, ignore_index=ignore_index)
    if input_ids is not None:
        arguments["input_ids"] = input_ids
    if num_items_in_batch is not None:
        arguments["num_items_in_batch"] = num_items_in_batch
    arguments["return_dict"] = True
    return _fused_forward(model, arguments, type(model).forward).loss


# ---------------------------------------------------------------------------------------------------
# patching


def _original_forward(model):
    previous = model.__dict__[_STATE]["previous"]
    return previous if previous is not None else types.MethodType(type(model).forward, model)


@functools.lru_cache(maxsize=256)
def _signature_of(fn):
    return inspect.signature(fn)


def _call_arguments(forward, args, kwargs) -> Optional[dict]:
    """The call's arguments by name (var-keyword ones merged in), or None if they don't bind."""
    fn = getattr(forward, "__func__", forward)
    try:
        sig = _signature_of(fn)
        bound = sig.bind_partial(*((None,) + args if fn is not forward else args), **kwargs)
    except (TypeError, ValueError):
        return None
    arguments = dict(bound.arguments)
    if fn is not forward:
        arguments.pop(next(iter(sig.parameters)))  # self
    for name, param in sig.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD and name in arguments:
            arguments.update(arguments.pop(name))
        elif param.kind is inspect.Parameter.VAR_POSITIONAL and arguments.get(name):
            return None  # positional extras: can't tell what they are
    return arguments


def _patched_forward(model, *args, skip_logits: Optional[bool] = None, **kwargs):
    state = model.__dict__[_STATE]
    forward = _original_forward(model)
    arguments = _call_arguments(forward, args, kwargs)
    if arguments is None or arguments.get("labels") is None:
        return forward(*args, **kwargs)
    if skip_logits is None:
        skip_logits = model.training or not state["training_only"]
    keep = arguments.get("logits_to_keep", arguments.get("num_logits_to_keep", 0))
    if not skip_logits or not (isinstance(keep, int) and keep == 0):
        return forward(*args, **kwargs)
    return _fused_forward(model, arguments, type(model).forward)


def _make_forward(model):
    def forward(self, *args, **kwargs):
        return _patched_forward(self, *args, **kwargs)
    # keep the original signature visible: Trainer inspects it (remove_unused_columns, loss kwargs)
    forward.__signature__ = inspect.signature(type(model).forward)
    forward.__doc__ = (type(model).forward.__doc__ or "") + (
        "\n\nPatched by celoss: with labels (in training mode, or with skip_logits=True) the loss comes from "
        "celoss.linear_cross_entropy and logits is None.")
    forward.__name__ = forward.__qualname__ = "forward"
    return forward


def patch(model, *, training_only: bool = True):
    """Make ``model(..., labels=...)`` compute its loss with :func:`celoss.linear_cross_entropy`.

    Wraps this instance's ``forward`` (the class and other instances are untouched). A call with
    ``labels`` while ``model.training`` returns the usual output with ``loss`` set and ``logits=None``;
    calls without labels, and calls with labels in eval mode (so ``Trainer.evaluate`` still gets
    logits for its metrics), run the original forward. ``training_only=False`` uses the fused loss in
    eval mode too; a per-call ``skip_logits=True/False`` keyword overrides both. Returns ``model``.
    Idempotent; undo with :func:`unpatch`.
    """
    _check_model(model)
    if _STATE in model.__dict__:
        model.__dict__[_STATE]["training_only"] = bool(training_only)
        return model
    state = {"previous": model.__dict__.get("forward"), "training_only": bool(training_only)}
    model.__dict__[_STATE] = state
    model.forward = types.MethodType(_make_forward(model), model)
    return model


def unpatch(model):
    """Undo :func:`patch` (a no-op on a model that isn't patched). Returns ``model``."""
    state = model.__dict__.pop(_STATE, None)
    if state is None:
        return model
    if state["previous"] is not None:
        model.forward = state["previous"]
    else:
        model.__dict__.pop("forward", None)
    return model


def is_patched(model) -> bool:
    return _STATE in model.__dict__


@torch.no_grad()
def check(model, input_ids: Optional[Tensor] = None, *, rtol: float = 1e-3, atol: float = 1e-4) -> float:
    """Compare the fused loss with the model's own on ``input_ids`` (default: a random 2 x 16 batch), in
    eval mode without gradients; raises AssertionError on a mismatch, returns the fused loss."""
    _check_model(model)
    if input_ids is None:
        vocab = lm_head_spec(model).weight.shape[0]
        gen = torch.Generator().manual_seed(0)
        input_ids = torch.randint(0, vocab, (2, 16), generator=gen).to(lm_head_spec(model).weight.device)
    labels = input_ids.clone()
    labels[0, : labels.shape[1] // 2] = -100
    was_training = model.training
    model.eval()
    try:
        forward = _original_forward(model) if is_patched(model) else model.forward
        expected = forward(input_ids=input_ids, labels=labels, use_cache=False).loss.float()
        got = causal_lm_loss(model, input_ids, labels, use_cache=False)
    finally:
        model.train(was_training)
    if not torch.allclose(got, expected, rtol=rtol, atol=atol):
        raise AssertionError(f"celoss: fused loss {got.item():.6g} != {type(model).__name__}'s own loss "
                             f"{expected.item():.6g}; this model's forward does something celoss doesn't model")
    return float(got)
