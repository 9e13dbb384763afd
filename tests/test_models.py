import pytest

from engine.config import TeacherConfig
from engine.models import ModelError, _packaged_gguf, convert_gguf, load_causal_lm, load_tokenizer, resolve_model


def test_local_folder_hub_id_and_missing_path(tiny_model, tmp_path):
    assert resolve_model(TeacherConfig(model=str(tiny_model))) == str(tiny_model.resolve())
    assert resolve_model(TeacherConfig(model="HuggingFaceTB/SmolLM2-1.7B-Instruct")) == "HuggingFaceTB/SmolLM2-1.7B-Instruct"
    with pytest.raises(ModelError, match="teacher.model: no model folder at '/no/such/model'"):
        resolve_model(TeacherConfig(model="/no/such/model"))
    with pytest.raises(ModelError, match="has no config.json"):
        resolve_model(TeacherConfig(model=str(tmp_path)))


def test_weights_load_from_safetensors_only(tiny_model, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file

    pt_only = tmp_path / "pt"
    shutil.copytree(tiny_model, pt_only)
    torch.save(load_file(pt_only / "model.safetensors"), pt_only / "pytorch_model.bin")
    (pt_only / "model.safetensors").unlink()
    with pytest.raises(OSError):
        load_causal_lm(str(pt_only), "float32")
    assert load_causal_lm(str(tiny_model), "float32").training is False


@pytest.mark.slow
def test_packaged_gguf_converts_to_a_plain_llama(tmp_path):
    out = convert_gguf(_packaged_gguf("smollm2-135m-instruct"), tmp_path / "smollm2", "bfloat16")
    assert (out / "model.safetensors").is_file() and not list(tmp_path.glob("*.tmp-*"))
    model = load_causal_lm(str(out), "float32")
    tok = load_tokenizer(str(out))
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert "quantization_config" not in model.config.to_dict()
    ids = tok("Question: What melts ice?\nAnswer: heat", return_tensors="pt")["input_ids"]
    loss = model(ids, labels=ids).loss.item()
    assert loss < 6.0  # a real language model, not random weights (random: ~ln(49152) = 10.8)
