"""Checkpoint folders, and parity with Hugging Face transformers' LlamaForCausalLM (import and export)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.generation import SamplingParams, generate
from model.hf import import_hf
from model.llama import padding_attention_mask, positions_from_mask
from tests.helpers import debug_model, small_tokenizer

transformers = pytest.importorskip("transformers")


def test_checkpoint_round_trip(tmp_path):
    model, tok = debug_model(), small_tokenizer()
    save_checkpoint(tmp_path / "ckpt", model, tok, extra_files={"trainer_state/state.json": {"step": 3}})
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.model", "trainer_state"]
    loaded, loaded_tok = load_checkpoint(tmp_path / "ckpt")
    tokens = torch.randint(0, 512, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens), atol=0, rtol=0)
    assert loaded_tok.encode("the cat") == tok.encode("the cat")
    assert not list(tmp_path.glob(".ckpt*")), "no temporary folders left behind"


def test_corrupt_or_mismatched_checkpoints_are_clear_errors(tmp_path):
    save_checkpoint(tmp_path / "ok", debug_model(), small_tokenizer())
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_checkpoint(tmp_path / "nowhere")
    bad = tmp_path / "bad"
    save_checkpoint(bad, debug_model(), small_tokenizer())
    (bad / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(bad)
    save_checkpoint(bad, debug_model(), small_tokenizer())
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "dim": 128}))
    with pytest.raises(CheckpointError, match="wrong shapes"):
        load_checkpoint(bad)
    (bad / "config.json").write_text(json.dumps({**config, "flux": 1}))
    with pytest.raises(CheckpointError, match="unknown ModelArgs keys"):
        load_checkpoint(bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(bad)
    save_checkpoint(bad, debug_model(), small_tokenizer())
    (bad / "tokenizer.model").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="sentencepiece"):
        load_checkpoint(bad)
    state = {k: v for k, v in debug_model().state_dict().items() if k != "norm.weight"}
    save_file(state, bad / "model.safetensors")
    small_tokenizer().save(bad / "tokenizer.model")
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(bad)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """A randomly initialised small LlamaForCausalLM with GQA, saved with save_pretrained."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      rms_norm_eps=1e-5, initializer_range=0.1, bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("hf")
    model.save_pretrained(folder)
    small_tokenizer().save(folder / "tokenizer.model")
    return model, folder


def padded_batch():
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, 512, (3, 24), generator=gen)
    valid = torch.ones(3, 24, dtype=torch.bool)
    valid[1, :7], valid[2, :15] = False, False
    return tokens, valid


def test_import_matches_transformers_logits_with_padding(hf_model, tmp_path):
    hf, folder = hf_model
    ours, tok = import_hf(folder, tmp_path / "ours")
    tokens, valid = padded_batch()
    with torch.no_grad():
        ref = hf(input_ids=tokens, attention_mask=valid.long()).logits
        got = ours(tokens, positions=positions_from_mask(valid), attn_mask=padding_attention_mask(valid, 24))
    assert (got - ref)[valid].abs().max() < 1e-4
    assert tok is not None and (tmp_path / "ours" / "model.safetensors").is_file()


def test_greedy_generation_identical_to_transformers(hf_model):
    hf, folder = hf_model
    ours, _ = import_hf(folder)
    tokens, valid = padded_batch()
    for row in range(3):
        prompt = tokens[row][valid[row]].tolist()
        expected = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                               do_sample=False, max_new_tokens=32, min_new_tokens=32, pad_token_id=0)
        got = generate(ours, [prompt], SamplingParams(max_new_tokens=32, temperature=0), eos_id=-1)
        assert got.tokens[0] == expected[0, len(prompt):].tolist()


def test_export_loads_in_transformers_with_same_logits(hf_model, tmp_path):
    hf, folder = hf_model
    import_hf(folder, tmp_path / "ours")
    # Through the CLI, both directions, as a user would.
    for args in (["from-hf", str(folder), str(tmp_path / "cli")], ["to-hf", str(tmp_path / "cli"), str(tmp_path / "back")]):
        subprocess.run([sys.executable, "-m", "model.convert", *args], check=True, capture_output=True)
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "back").eval()
    tokens, valid = padded_batch()
    with torch.no_grad():
        ref = hf(input_ids=tokens, attention_mask=valid.long()).logits
        got = back(input_ids=tokens, attention_mask=valid.long()).logits
    assert (got - ref)[valid].abs().max() < 1e-5
    for key, value in hf.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value, atol=0, rtol=0)
    # Llama 2 chat's sampling defaults travel with the export: what transformers and vLLM sample with by default.
    generation = transformers.GenerationConfig.from_pretrained(tmp_path / "back")
    assert (generation.do_sample, generation.temperature, generation.top_p) == (True, 0.6, 0.9)


def test_convert_cli_reports_errors(tmp_path):
    result = subprocess.run([sys.executable, "-m", "model.convert", "from-hf", str(tmp_path), str(tmp_path / "x")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "config.json is missing" in result.stderr


def test_info_cli_prints_exact_count():
    out = subprocess.run([sys.executable, "-m", "model.info", "llama2-70b"], capture_output=True, text=True,
                         check=True).stdout
    assert "parameters: 68,976,648,192" in out
