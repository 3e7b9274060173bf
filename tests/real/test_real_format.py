"""Templates for real models: the checkpoint's chat template when it has one, the Alpaca template (as the
git-disl reference tokenises it) otherwise; LoRA targets found by module type; loading options."""
from __future__ import annotations

import pytest
import torch

from hftlab.config import ModelConfig, TrainConfig
from hftlab.data.example import Example
from hftlab.data.format import ALPACA, ALPACA_INPUT, Formatter, with_input
from hftlab.models.loading import ModelLoadError, add_lora, device, load_model, load_tokenizer, lora_target_names
from real import tiny


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    return {"plain": tiny.causal_lm(root / "plain"), "chat": tiny.causal_lm(root / "chat", chat=True)}


def test_alpaca_template_without_chat_template(models):
    tok = load_tokenizer(models["plain"], ModelConfig())
    fmt = Formatter(tok, "auto", max_length=512)
    assert fmt.template == "alpaca"
    text = ALPACA.format(prompt="Say hi")
    assert text.endswith("### Instruction:\nSay hi\n\n### Response:\n")
    # the reference tokenises the prompt with ``tokenizer(prompt)``: BOS from the tokenizer, no EOS
    assert fmt.prompt_ids("Say hi") == tok(text)["input_ids"] and fmt.prompt_ids("Say hi")[0] == tok.bos_token_id
    enc = fmt.encode(Example(prompt="Say hi", response="hello", kind="chat"))
    n = len(fmt.prompt_ids("Say hi"))
    assert enc["labels"][:n] == [-100] * n and enc["labels"][n:] == tok("hello", add_special_tokens=False)[
        "input_ids"] + [tok.eos_token_id]


def test_alpaca_input_variant(models):
    fmt = Formatter(load_tokenizer(models["plain"], ModelConfig()), "alpaca")
    prompt = with_input("Classify the sentiment", "a fine film")
    expected = ALPACA_INPUT.format(prompt=prompt)
    assert expected == ("Below is an instruction that describes a task, paired with an input that provides further "
                        "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                        "Classify the sentiment\n\n### Input:\na fine film\n\n### Response:\n")
    assert fmt.prompt(prompt) == fmt.tok.bos_token + expected


def test_chat_template_when_present(models):
    tok = load_tokenizer(models["chat"], ModelConfig())
    fmt = Formatter(tok, "auto")
    assert fmt.template == "chat"
    text = fmt.prompt(with_input("Classify", "a film"), system="Be brief.")
    assert text.startswith("<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>")
    assert "Classify\n\na film<|eot_id|>" in text and text.endswith("assistant<|end_header_id|>\n\n")
    assert Formatter(tok, "alpaca").template == "alpaca"  # model.template=alpaca forces the reference template


def test_generation_batch_left_pads_consistently(models):
    fmt = Formatter(load_tokenizer(models["plain"], ModelConfig()), "alpaca")
    batch = fmt.generation_batch(["short", "a considerably longer prompt here"])
    assert batch["input_ids"].shape[0] == 2 and batch["attention_mask"][0, 0] == 0
    row = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    assert row == fmt.prompt_ids("short")


def test_lora_targets_by_module_type(models, tmp_path):
    llama = load_model(models["plain"], ModelConfig())
    assert lora_target_names(llama, ["q_proj", "k_proj", "v_proj"]) == ["k_proj", "q_proj", "v_proj"]
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=64))
    assert lora_target_names(gpt2, ["q_proj", "k_proj", "v_proj"]) == ["c_attn", "c_proj"]
    peft = add_lora(llama, TrainConfig(lora=True, lora_r=4, lora_alpha=4.0))
    trainable = [n for n, p in peft.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_loading_options(models, tmp_path):
    model = load_model(models["plain"], ModelConfig(gradient_checkpointing=True))
    assert model.is_activation_checkpointing and model.config.use_cache is False
    assert next(model.parameters()).dtype == (torch.bfloat16 if device().type == "cuda" else torch.float32)
    pickled = tmp_path / "pickled"  # a checkpoint with pickled weights only (as many older hub models)
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(ModelLoadError):
        load_model(pickled, ModelConfig())  # safetensors only by default
    assert load_model(pickled, ModelConfig(safetensors_only=False)) is not None
