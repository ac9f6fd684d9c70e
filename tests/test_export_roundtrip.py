"""The exported folder answers like the trained model through the plain Auto* classes (issue 16)."""

from __future__ import annotations

import warnings

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tre_lightning.models import TinyRandomSource
from tre_lightning.tasks.embedded.tokenizer import QUICKSTART_CHARS, quickstart_tokenizer
from tre_lightning.training.export import auto_loadable_tokenizer, export_hf, round_trip_probe
from test_module_support import CharTask, fit, tiny_module, trainer

PROMPTS = ["what is 12 plus 3\n", "spell  cat ", "a b\nc"]  # in the vocabulary (out of it: see export.py)


def _greedy(model, tok, text: str) -> tuple[list[int], str]:
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                  tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    new = out[0, ids["input_ids"].shape[1]:].tolist()
    return ids["input_ids"][0].tolist() + new, tok.decode(new, skip_special_tokens=False)


def test_trained_module_export_round_trips_through_auto_classes(tmp_path) -> None:
    """Train one PPO iteration with the quickstart's character set, export, reload with AutoTokenizer /
    AutoModelForCausalLM only: prompt ids, greedy continuations and their text equal training's.

    Fails on the export before issue 16 (checked): AutoTokenizer built Qwen2Tokenizer, which dropped the
    spaces and newlines of the prompts, so the ids and the answers differed."""
    source = TinyRandomSource(hidden_size=32, intermediate_size=64, chars=QUICKSTART_CHARS, n_filler=40)
    module = tiny_module(CharTask(), source=source)
    fit(trainer(tmp_path, max_steps=1), module)
    folder = tmp_path / "hf"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the round-trip check must not warn
        module.export_hf(str(folder))
    auto_tok = AutoTokenizer.from_pretrained(folder)
    auto_model = AutoModelForCausalLM.from_pretrained(folder).eval()
    actor = module.model.actor.eval()
    for prompt in PROMPTS:
        assert _greedy(auto_model, auto_tok, prompt) == _greedy(actor, module.tokenizer, prompt)


def test_quickstart_tokenizer_rewrite_keeps_ids_text_and_specials(tmp_path) -> None:
    """The byte-level rewrite of the embedded tokenizer encodes and decodes like the original."""
    tok = quickstart_tokenizer(96)
    new = auto_loadable_tokenizer(tok)
    probe = round_trip_probe(tok)
    assert new(probe)["input_ids"] == tok(probe)["input_ids"]
    ids = tok(probe)["input_ids"]
    assert new.decode(ids) == tok.decode(ids) == probe
    assert (new.eos_token_id, new.pad_token_id, len(new)) == (tok.eos_token_id, tok.pad_token_id, len(tok))
    assert new.chat_template == tok.chat_template


def test_export_warns_when_auto_tokenizer_disagrees(tmp_path, monkeypatch) -> None:
    """Without the rewrite the check fires (the export before issue 16 loaded differently)."""
    import tre_lightning.training.export as export

    source = TinyRandomSource(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1)
    monkeypatch.setattr(export, "auto_loadable_tokenizer", lambda tok: tok)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_hf(source.causal_lm(), source.tokenizer(), str(tmp_path / "hf"))
    assert any("does not encode text like the training tokenizer" in str(w.message) for w in caught)
