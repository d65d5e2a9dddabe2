"""triton_softmax.integrations.transformers: a patched HF causal LM gives HF's loss and every
parameter's gradient without the logits, in its own forward, in transformers' Trainer and in
TRL's SFTTrainer. Tiny models built from configs (no download), run on the CPU through Triton's
interpreter (tests/conftest.py), so the patched loss goes through our kernels."""

import copy
import math
import subprocess
import sys
import tempfile
from unittest import mock

import pytest
import torch

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("triton_softmax.integrations.transformers")

VOCAB = 96
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

#: model class -> its config class and what differs from TINY. The Gemma caps are small so
#: that the soft-capping changes the loss of a random model (its logits are O(1)).
MODELS = {
    "LlamaForCausalLM": ("LlamaConfig", {}),
    "MistralForCausalLM": ("MistralConfig", {}),
    "Qwen2ForCausalLM": ("Qwen2Config", {}),
    "Qwen3ForCausalLM": ("Qwen3Config", {}),
    "GemmaForCausalLM": ("GemmaConfig", {}),
    "Gemma2ForCausalLM": ("Gemma2Config", {"final_logit_softcapping": 1.5}),
    "Gemma3ForCausalLM": ("Gemma3TextConfig", {"final_logit_softcapping": 2.0}),
    "Phi3ForCausalLM": ("Phi3Config", {}),
}


def tiny_model(name="LlamaForCausalLM", dtype=torch.float32, **overrides):
    config_name, extra = MODELS[name]
    config = getattr(transformers, config_name)(**{**TINY, **extra, **overrides})
    model = getattr(transformers, name)(config).to(dtype)
    with torch.no_grad():  # logits of a few units, as a trained model's: the caps bite
        model.lm_head.weight.normal_(0.0, 0.5)
    return model


def batch(batch_size=2, length=9, ignored=True):
    ids = torch.randint(3, VOCAB, (batch_size, length))
    labels = ids.clone()
    if ignored:
        labels[0, :4] = -100  # a prompt
        labels[1, -2:] = -100  # padding
    return ids, labels


def assert_same_grads(reference, patched, rtol):
    for (name, p), q in zip(reference.named_parameters(), patched.parameters(), strict=True):
        assert q.grad is not None, name
        scale = p.grad.abs().max().item()
        torch.testing.assert_close(q.grad, p.grad, atol=rtol * scale, rtol=0, msg=name)


def test_library_does_not_import_transformers():
    code = (
        "import sys, torch, triton_softmax, triton_softmax.integrations\n"
        "triton_softmax.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), "
        "torch.tensor([0, 1, 2]))\n"
        "import triton_softmax.nn, triton_softmax.functional\n"
        "assert 'transformers' not in sys.modules, 'transformers imported'\n"
        "import triton_softmax.integrations.transformers\n"
        "assert 'transformers' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("num_items", [None, 11])
def test_loss_and_grads_match_hf(name, num_items):
    reference = tiny_model(name)
    patched = hf.patch(copy.deepcopy(reference))
    ids, labels = batch()
    loss_kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    expected = reference(input_ids=ids, labels=labels, **loss_kwargs)
    with mock.patch.object(hf, "linear_cross_entropy", wraps=hf.linear_cross_entropy) as fused:
        got = patched(input_ids=ids, labels=labels, **loss_kwargs)
    assert fused.call_count == 1
    assert got.logits is None
    assert got.loss.dtype == torch.float32
    torch.testing.assert_close(got.loss, expected.loss, rtol=2e-6, atol=0)
    expected.loss.backward()
    got.loss.backward()
    assert_same_grads(reference, patched, rtol=1e-5)


def test_float64_gradients_exact():
    # HF's ForCausalLMLoss casts the logits to float32 (float64 ones too), as the patch casts
    # its loss; the gradients stay float64, so they are checked against float64 logits.
    reference = tiny_model("Gemma2ForCausalLM", dtype=torch.float64)
    patched = hf.patch(copy.deepcopy(reference))
    ids, labels = batch()
    cap = reference.config.final_logit_softcapping
    logits = reference.lm_head(reference.model(input_ids=ids).last_hidden_state)[:, :-1]
    logits = cap * torch.tanh(logits / cap)
    targets = labels[:, 1:].reshape(-1)
    flat = logits.reshape(-1, VOCAB)
    expected = torch.nn.functional.cross_entropy(flat, targets, reduction="sum") / 7
    got = patched(input_ids=ids, labels=labels, num_items_in_batch=7)
    assert got.loss.dtype == torch.float32
    torch.testing.assert_close(got.loss, expected.float(), rtol=2e-7, atol=0)
    expected.backward()
    got.loss.backward()
    assert_same_grads(reference, patched, rtol=1e-10)


def test_softcap_is_applied():
    # The cap comes from the config: without it the loss would be the uncapped model's.
    model = tiny_model("Gemma2ForCausalLM")
    ids, labels = batch()
    capped = hf.patch(copy.deepcopy(model))(input_ids=ids, labels=labels).loss
    model.config.final_logit_softcapping = None
    uncapped = model(input_ids=ids, labels=labels).loss
    assert abs(capped.item() - uncapped.item()) > 0.1


def test_without_labels_the_original_forward_runs():
    reference = tiny_model("Qwen2ForCausalLM")
    patched = hf.patch(copy.deepcopy(reference))
    ids, _ = batch()
    with mock.patch.object(hf, "linear_cross_entropy") as fused:
        torch.testing.assert_close(
            patched(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=0
        )
        generated = patched.generate(ids[:, :4], max_new_tokens=3, do_sample=False)
    fused.assert_not_called()
    torch.testing.assert_close(
        generated, reference.generate(ids[:, :4], max_new_tokens=3, do_sample=False)
    )


def test_positional_labels_return_dict_and_outputs():
    reference = tiny_model()
    patched = hf.patch(copy.deepcopy(reference))
    ids, labels = batch()
    mask = torch.ones_like(ids)
    expected = reference(ids, mask, None, None, None, labels, output_hidden_states=True)
    got = patched(ids, mask, None, None, None, labels, output_hidden_states=True)
    torch.testing.assert_close(got.loss, expected.loss, rtol=2e-6, atol=0)
    assert len(got.hidden_states) == len(expected.hidden_states) == 2
    as_tuple = patched(input_ids=ids, labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], expected.loss, rtol=2e-6, atol=0)


def test_logits_to_keep_with_shift_labels():
    reference = tiny_model()
    patched = hf.patch(copy.deepcopy(reference))
    ids, labels = batch()
    kept = labels[:, -4:].clone()  # targets of the last 4 positions, already shifted
    kept[0, 0] = -100
    expected = reference(input_ids=ids, labels=labels, shift_labels=kept, logits_to_keep=4)
    got = patched(input_ids=ids, labels=labels, shift_labels=kept, logits_to_keep=4)
    torch.testing.assert_close(got.loss, expected.loss, rtol=2e-6, atol=0)
    expected.loss.backward()
    got.loss.backward()
    assert_same_grads(reference, patched, rtol=1e-5)
    with pytest.raises(ValueError, match="logits_to_keep leaves fewer positions"):
        patched(input_ids=ids, labels=labels, logits_to_keep=4)


def test_loss_options_pass_through():
    model = tiny_model()
    ids, labels = batch()
    logits = model(input_ids=ids).logits[:, :-1].reshape(-1, VOCAB).double()
    targets = labels[:, 1:].reshape(-1)
    counted = targets != -100
    smoothed = torch.nn.functional.cross_entropy(logits, targets, label_smoothing=0.1)
    z = (torch.logsumexp(logits[counted], -1) ** 2).mean()
    with hf.patched(model, label_smoothing=0.1, z_loss=1e-2):
        got = model(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(got.double(), smoothed + 1e-2 * z, rtol=2e-6, atol=0)
    assert not hf.is_patched(model)
    # temperature (the RL head's): the loss of the logits divided by it.
    tempered = torch.nn.functional.cross_entropy(logits / 2.0, targets)
    with hf.patched(model, temperature=2.0):
        got = model(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(got.double(), tempered, rtol=2e-6, atol=0)


def test_patch_unpatch_and_refusals():
    model = tiny_model()
    original_forward = model.forward
    assert hf.patch(model) is model and hf.is_patched(model)
    with pytest.raises(ValueError, match="already patched"):
        hf.patch(model)
    hf.unpatch(model)
    assert "forward" not in vars(model) and model.forward == original_forward
    with pytest.raises(ValueError, match="not patched"):
        hf.unpatch(model)
    # Each instance is patched on its own: the class and other instances are untouched.
    other = tiny_model()
    with hf.patched(model):
        assert model.forward != original_forward
        assert other(input_ids=batch()[0], labels=batch()[1]).logits is not None
    with pytest.raises(ValueError, match="loss option"):
        hf.patch(model, reduction="sum")
    with pytest.raises(ValueError, match="loss option"):
        hf.patch(model, return_entropy=True)
    with pytest.raises(ValueError, match="loss option"):
        hf.patch(model, no_such_option=1)
    with pytest.raises(ValueError, match="final_logit_softcapping=1.5"):
        hf.patch(tiny_model("Gemma2ForCausalLM"), softcap=3.0)
    assert not hf.is_patched(model)


def test_unknown_layouts_refused_in_one_line():
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4)
    )
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel is not a supported") as info:
        hf.patch(gpt2)
    assert "\n" not in str(info.value)

    class Custom(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    with pytest.raises(ValueError, match="Custom overrides LlamaForCausalLM.forward"):
        hf.patch(Custom(tiny_model().config))
    model = tiny_model()
    model.lm_head = torch.nn.Sequential(model.lm_head)
    with pytest.raises(ValueError, match="lm_head is Sequential"):
        hf.patch(model)
    # A head swapped after patching is caught at the call, not silently bypassed.
    model = hf.patch(tiny_model())
    model.lm_head = torch.nn.Sequential(model.lm_head)
    with pytest.raises(ValueError, match="lm_head is Sequential"):
        model(input_ids=batch()[0], labels=batch()[1])


def _lm_dataset(rows=8, length=10):
    datasets = pytest.importorskip("datasets")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (rows, length), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    labels[::3, -3:] = -100
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


def _train_losses(trainer):
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


#: A few SGD steps: Adam's first steps are lr * sign(grad), which turns fp32 rounding noise in
#: near-zero gradients into full-size updates; SGD keeps the comparison about the loss.
TRAIN = dict(
    per_device_train_batch_size=2,
    gradient_accumulation_steps=2,  # Trainer passes num_items_in_batch
    max_steps=3,
    logging_steps=1,
    learning_rate=0.5,
    optim="sgd",
    report_to=[],
    use_cpu=True,
    seed=0,
    save_strategy="no",
    dataloader_num_workers=0,
)


def test_trainer_same_logged_losses():
    dataset = _lm_dataset()
    runs = []
    for patched in (False, True):
        torch.manual_seed(0)
        model = tiny_model()
        if patched:
            hf.patch(model)
        with tempfile.TemporaryDirectory() as out:
            args = transformers.TrainingArguments(output_dir=out, **TRAIN)
            trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset)
            with mock.patch.object(
                hf, "linear_cross_entropy", wraps=hf.linear_cross_entropy
            ) as fused:
                runs.append(_train_losses(trainer))
        assert fused.call_count == (6 if patched else 0)  # 3 steps x 2 micro-batches
    assert len(runs[0]) == 3 and runs[0][0] != runs[0][-1]
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-5, atol=0)


def _sft_run(patch_options, dataset, tokenizer):
    trl = pytest.importorskip("trl")
    torch.manual_seed(0)
    model = tiny_model()
    with tempfile.TemporaryDirectory() as out:
        # SFTConfig defaults to bf16 autocast, where TRL's head and ours round the head's
        # inputs to bf16 differently: compared in float32.
        args = trl.SFTConfig(output_dir=out, bf16=False, **TRAIN)
        trainer = trl.SFTTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer
        )
        if patch_options is not None:
            hf.patch(trainer.model, **patch_options)
        with mock.patch.object(hf, "linear_cross_entropy", wraps=hf.linear_cross_entropy) as fused:
            trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert fused.call_count == (0 if patch_options is None else 6)
    return {key: [h[key] for h in logs] for key in ("loss", "entropy", "mean_token_accuracy")}


def _word_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, VOCAB)})
    words = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<unk>"))
    words.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=words, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def _text_dataset():
    datasets = pytest.importorskip("datasets")
    g = torch.Generator().manual_seed(1)
    texts = []
    for _ in range(12):
        length = int(torch.randint(4, 11, (), generator=g))
        words = torch.randint(4, VOCAB, (length,), generator=g)
        texts.append(" ".join(f"w{int(i)}" for i in words))
    return datasets.Dataset.from_dict({"text": texts})


def test_sft_trainer_same_logged_losses_and_metrics():
    # SFTTrainer installs TRL's own fused LM head; patch(trainer.model) after building the
    # trainer serves its fused_lm_head=True calls with our kernels, TRL's metrics included.
    dataset, tokenizer = _text_dataset(), _word_tokenizer()
    reference = _sft_run(None, dataset, tokenizer)
    ours = _sft_run({}, dataset, tokenizer)
    assert len(reference["loss"]) == 3 and reference["loss"][0] != reference["loss"][-1]
    for key in ("loss", "entropy", "mean_token_accuracy"):
        torch.testing.assert_close(ours[key], reference[key], rtol=1e-5, atol=0, msg=key)
    off = _sft_run({"token_metrics": False}, dataset, tokenizer)
    torch.testing.assert_close(off["loss"], reference["loss"], rtol=1e-5, atol=0)
    assert all(math.isnan(v) for v in off["entropy"] + off["mean_token_accuracy"])


def test_trl_fused_call_refuses_loss_options():
    trl_utils = pytest.importorskip("trl.trainer.utils")
    model = tiny_model()
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    hf.patch(model, z_loss=1e-3)
    ids, labels = batch()
    with pytest.raises(ValueError, match="z_loss"):
        model(input_ids=ids, labels=labels, fused_lm_head=True)
    trl_utils.add_fused_lm_head(model)  # wraps the patched forward
    with pytest.raises(RuntimeError, match="replaced after patch"):
        hf.unpatch(model)
