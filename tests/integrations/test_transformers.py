"""celoss.integrations.transformers on tiny randomly initialised Hugging Face causal LMs (no downloads):
the patched loss and every parameter's gradient match the unpatched model, generation is unchanged."""
import copy
import inspect
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed "
                                   "(pip install 'celoss[transformers]')")

from celoss.integrations import transformers as integ  # noqa: E402

VOCAB = 131
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _config(name):
    if name == "llama":
        return transformers.LlamaConfig(**COMMON), transformers.LlamaForCausalLM
    if name == "qwen2":
        return transformers.Qwen2Config(**COMMON), transformers.Qwen2ForCausalLM
    if name == "mistral":
        return transformers.MistralConfig(**COMMON, sliding_window=None), transformers.MistralForCausalLM
    if name == "gemma2":
        # a low cap and a larger init so that the soft cap actually bends the logits
        cfg = transformers.Gemma2Config(**COMMON, head_dim=8, final_logit_softcapping=1.5,
                                        initializer_range=0.2, sliding_window=8)
        return cfg, transformers.Gemma2ForCausalLM
    if name == "cohere":  # logits * config.logit_scale
        return transformers.CohereConfig(**COMMON, logit_scale=0.5), transformers.CohereForCausalLM
    if name == "granite":  # logits / config.logits_scaling
        return transformers.GraniteConfig(**COMMON, logits_scaling=4.0), transformers.GraniteForCausalLM
    if name == "mixtral":  # router load-balancing loss added to the LM loss
        cfg = transformers.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2,
                                         output_router_logits=True, router_aux_loss_coef=0.1, sliding_window=None)
        return cfg, transformers.MixtralForCausalLM
    raise ValueError(name)


def _pair(name, seed=0):
    """(reference model, patched deep copy), fp32, training mode, eager attention."""
    cfg, cls = _config(name)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    ref = cls(cfg).float().train()
    model = integ.patch(copy.deepcopy(ref))
    return ref, model


def _batch(padded, seed=1, batch=3, seq=14):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=gen)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    if padded:
        mask[0, -5:] = 0  # right padding
        ids[0, -5:] = 0
        labels[0, -5:] = -100
        labels[1, :4] = -100  # a prompt that isn't scored
    return ids, mask, labels


def _grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _assert_grads_close(ref, model):
    g_ref, g = _grads(ref), _grads(model)
    assert g_ref.keys() == g.keys()
    assert sum(g is not None for g in g_ref.values()) > len(g_ref) // 2
    for name, expected in g_ref.items():
        assert (expected is None) == (g[name] is None), name
        if expected is None:
            continue
        scale = expected.abs().max().item() + 1e-12
        err = (g[name] - expected).abs().max().item()
        assert err <= 1e-5 * max(scale, 1.0) + 1e-4 * scale, f"{name}: max err {err:.3g} (grad scale {scale:.3g})"


MODELS = ["llama", "qwen2", "mistral", "gemma2"]
EXTRA = ["cohere", "granite", "mixtral"]


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("name", MODELS + EXTRA)
def test_loss_and_grads_match(name, padded):
    ref, model = _pair(name)
    ids, mask, labels = _batch(padded)
    out_ref = ref(input_ids=ids, attention_mask=mask, labels=labels)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None
    assert type(out) is type(out_ref)
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=1e-6)
    if name == "mixtral":
        torch.testing.assert_close(out.aux_loss, out_ref.aux_loss)
    out_ref.loss.backward()
    out.loss.backward()
    _assert_grads_close(ref, model)


def test_softcap_is_active():
    """The Gemma 2 config really caps: without the cap the loss would differ (guards the test above)."""
    ref, _ = _pair("gemma2")
    ids, mask, labels = _batch(False)
    with torch.no_grad():
        capped = ref(input_ids=ids, labels=labels).loss
        ref.config.final_logit_softcapping = None
        uncapped = ref(input_ids=ids, labels=labels).loss
    assert abs(capped.item() - uncapped.item()) > 1e-2
    assert integ.lm_head_spec(_pair("gemma2")[1]).softcap == 1.5


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_num_items_in_batch_and_positional_labels(name):
    """Trainer's gradient-accumulation convention: sum / num_items_in_batch; labels passed positionally."""
    ref, model = _pair(name)
    ids, mask, labels = _batch(True)
    n = torch.tensor(57)
    out_ref = ref(ids, mask, labels=labels, num_items_in_batch=n)
    # LlamaForCausalLM.forward(input_ids, attention_mask, position_ids, cache, inputs_embeds, labels, ...)
    names = list(inspect.signature(ref.forward).parameters)
    positional = [dict(input_ids=ids, attention_mask=mask, labels=labels).get(p) for p in names[:names.index("labels") + 1]]
    out = model(*positional, num_items_in_batch=n)
    assert out.logits is None
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=1e-6)
    out_ref.loss.backward()
    out.loss.backward()
    _assert_grads_close(ref, model)


def _loss_takes_shift_labels():
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except ImportError:
        return False
    return "shift_labels" in inspect.signature(ForCausalLMLoss).parameters


@pytest.mark.skipif(not _loss_takes_shift_labels(), reason="this transformers version has no shift_labels")
def test_shift_labels_and_ignore_index():
    ref, model = _pair("qwen2")
    ids, mask, labels = _batch(True)
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    shifted[shifted == -100] = -1
    out_ref = ref(input_ids=ids, attention_mask=mask, labels=labels, shift_labels=shifted, ignore_index=-1)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, shift_labels=shifted, ignore_index=-1)
    assert out.logits is None
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=1e-6)


def test_return_dict_false_and_output_fields():
    ref, model = _pair("llama")
    ids, mask, labels = _batch(True)
    out_ref = ref(input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, output_hidden_states=True)
    assert len(out.hidden_states) == len(out_ref.hidden_states)
    for a, b in zip(out.hidden_states, out_ref.hidden_states):
        torch.testing.assert_close(a, b)
    tup = model(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
    assert isinstance(tup, tuple)
    torch.testing.assert_close(tup[0], out_ref.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", MODELS)
def test_generation_and_logits_unchanged(name):
    ref, model = _pair(name)
    ref.eval()
    model.eval()
    ids, mask, _ = _batch(False, batch=2, seq=6)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = ref.generate(ids, attention_mask=mask, **kwargs)
        got = model.generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(got, expected)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
        model.train()
        ref.train()
        assert torch.equal(model(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits)


def test_eval_mode_keeps_logits_and_skip_logits_overrides():
    ref, model = _pair("llama")
    ids, mask, labels = _batch(True)
    model.eval()
    ref.eval()
    with torch.no_grad():
        out_ref = ref(input_ids=ids, labels=labels)
        out = model(input_ids=ids, labels=labels)          # eval: original forward, logits kept
        assert out.logits is not None and torch.equal(out.logits, out_ref.logits)
        fused = model(input_ids=ids, labels=labels, skip_logits=True)
        assert fused.logits is None
        torch.testing.assert_close(fused.loss, out_ref.loss, rtol=1e-5, atol=1e-6)
        integ.patch(model, training_only=False)
        assert model(input_ids=ids, labels=labels).logits is None
        model.train()
        assert model(input_ids=ids, labels=labels, skip_logits=False).logits is not None


def test_patch_unpatch_signature_deepcopy():
    ref, model = _pair("llama")
    assert integ.is_patched(model) and not integ.is_patched(ref)
    # Trainer reads the forward signature (remove_unused_columns, loss kwargs)
    assert inspect.signature(model.forward) == inspect.signature(ref.forward)
    assert integ.patch(model) is model  # idempotent
    ids, _, labels = _batch(False)
    clone = copy.deepcopy(model)
    assert integ.is_patched(clone) and clone.forward.__self__ is clone
    assert clone(input_ids=ids, labels=labels).logits is None
    assert "lm_head.weight" in model.state_dict()
    integ.unpatch(model)
    assert not integ.is_patched(model) and "forward" not in model.__dict__
    assert model(input_ids=ids, labels=labels).logits is not None
    integ.unpatch(model)  # no-op


def test_causal_lm_loss_without_patching_and_check():
    ref, _ = _pair("gemma2")
    ids, mask, labels = _batch(True)
    expected = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
    got = integ.causal_lm_loss(ref, ids, labels, attention_mask=mask)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not integ.is_patched(ref)
    integ.check(ref)
    spec = integ.lm_head_spec(ref)
    assert spec.weight is ref.get_output_embeddings().weight and spec.bias is None and spec.softcap == 1.5


def test_check_catches_a_head_celoss_does_not_model():
    ref, model = _pair("llama")
    model.config.logit_scale = 0.5  # LlamaForCausalLM ignores it, celoss would scale: check() must notice
    with pytest.raises(AssertionError, match="fused loss"):
        integ.check(model)


def test_unsupported_heads_and_models():
    ref, _ = _pair("llama")
    ref.lm_head = torch.nn.Sequential(torch.nn.Linear(32, VOCAB))
    with pytest.raises((TypeError, ValueError)):
        integ.patch(ref)
    with pytest.raises(TypeError):
        integ.patch(torch.nn.Linear(2, 2))


def test_linear_bias_is_used():
    """A head with a bias (as some checkpoints have): the fused loss includes it and its gradient."""
    ref, model = _pair("llama")
    for m in (ref, model):
        m.lm_head.bias = torch.nn.Parameter(torch.linspace(-1, 1, VOCAB))
    ids, mask, labels = _batch(True)
    out_ref = ref(input_ids=ids, attention_mask=mask, labels=labels)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=1e-6)
    out_ref.loss.backward()
    out.loss.backward()
    _assert_grads_close(ref, model)


def test_trainer_smoke(tmp_path):
    """Two optimizer steps through transformers.Trainer with gradient accumulation (num_items_in_batch),
    patched vs unpatched from the same seed: same losses, logits never built in training."""
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    from transformers import Trainer, TrainingArguments

    ids, mask, labels = _batch(True, batch=8, seq=12)
    rows = [dict(input_ids=ids[i], attention_mask=mask[i], labels=labels[i]) for i in range(8)]

    def run(patched):
        ref, model = _pair("llama")
        model = model if patched else ref
        logits_seen = []
        model.register_forward_hook(lambda m, a, o: logits_seen.append(o.logits is not None))
        args = TrainingArguments(output_dir=str(tmp_path / str(patched)), per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, max_steps=2, learning_rate=1e-2, logging_steps=1,
                                 report_to=[], use_cpu=True, save_strategy="no", seed=0, data_seed=0,
                                 dataloader_num_workers=0, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=rows)
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        return losses, logits_seen, [p.detach().clone() for p in model.parameters()]

    losses_ref, seen_ref, params_ref = run(False)
    losses, seen, params = run(True)
    assert all(seen_ref) and seen and not any(seen)
    assert len(losses) == 2
    assert losses == pytest.approx(losses_ref, rel=1e-4, abs=1e-5)
    for a, b in zip(params, params_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_autocast_bf16():
    """Under autocast the head sees what nn.Linear would (bf16 operands); loss and gradients stay close."""
    ref, model = _pair("llama")
    ids, mask, labels = _batch(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ref = ref(input_ids=ids, attention_mask=mask, labels=labels)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None and out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, out_ref.loss.float(), rtol=2e-2, atol=2e-2)
    out_ref.loss.backward()
    out.loss.backward()
    assert model.lm_head.weight.grad.dtype == torch.float32
    torch.testing.assert_close(model.lm_head.weight.grad, ref.lm_head.weight.grad, rtol=0.1, atol=2e-3)


def test_gradient_checkpointing_and_inputs_embeds():
    ref, model = _pair("qwen2")
    for m in (ref, model):  # renamed activation_checkpointing_enable in transformers 5
        if hasattr(m, "activation_checkpointing_enable"):
            m.activation_checkpointing_enable()
        else:  # reentrant checkpoints pass no gradient to the layers when the inputs don't require one
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, mask, labels = _batch(True)
    embeds = ref.get_input_embeddings()(ids).detach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out_ref = ref(inputs_embeds=embeds, attention_mask=mask, labels=labels, use_cache=False)
        out = model(inputs_embeds=embeds, attention_mask=mask, labels=labels, use_cache=False)
    assert out.logits is None
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=1e-6)
    out_ref.loss.backward()
    out.loss.backward()
    _assert_grads_close(ref, model)
