"""``driftwood generate`` and ``driftwood chat`` end to end on a tiny random model."""

from __future__ import annotations

import io
import json

from driftwood.cli.main import main
from driftwood.model import SamplingParams, load_model
from driftwood.model.generate import complete


def test_generate_json_matches_the_engine(tiny_gguf, capsys):
    path = str(tiny_gguf("q8_0"))
    rc = main(["generate", "--model", path, "--prompt", "<|begin_of_text|>Hello world",
               "--max-tokens", "8", "--device", "cpu", "--dtype", "float32", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"prompt_ids", "output_ids", "text", "timings"}
    model = load_model(path, device="cpu", dtype="float32", progress=False)
    # special tokens in the text are parsed; BOS is added per the model (llama-bpe: yes)
    assert out["prompt_ids"] == model.tokenizer.encode("<|begin_of_text|>Hello world")
    assert out["prompt_ids"][:2] == [model.tokenizer.bos_id] * 2
    want = complete(model.new_session(), out["prompt_ids"], SamplingParams(), 8)
    assert out["output_ids"] == want.output_ids and out["text"] == want.text
    assert out["timings"]["prompt_tokens"] == len(out["prompt_ids"])


def test_generate_streams_text_from_prompt_ids(tiny_gguf, capsys):
    path = str(tiny_gguf("f32"))
    rc = main(["generate", "--model", path, "--prompt-ids", "5,6,7,8", "--max-tokens", "6",
               "--device", "cpu", "--temperature", "0.8", "--seed", "1"])
    assert rc == 0
    captured = capsys.readouterr()
    model = load_model(path, device="cpu", progress=False)
    want = complete(model.new_session(seed=1), [5, 6, 7, 8], SamplingParams(temperature=0.8), 6)
    assert captured.out == want.text + "\n"
    assert "generated" in captured.err


def test_bad_prompt_ids_is_one_line(tiny_gguf, capsys):
    rc = main(["generate", "--model", str(tiny_gguf("f32")), "--prompt-ids", "1,x"])
    assert rc == 1
    assert capsys.readouterr().err.strip().startswith("driftwood: error: --prompt-ids")


def test_missing_model_is_one_line(capsys):
    rc = main(["generate", "--model", "/nonexistent/model.gguf", "--prompt", "hi"])
    assert rc == 1
    assert "model file not found" in capsys.readouterr().err


def test_chat_keeps_the_conversation(tiny_gguf, capsys, monkeypatch):
    path = str(tiny_gguf("f32"))
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\nAnd again\n/exit\n"))
    rc = main(["chat", "--model", path, "--max-tokens", "5", "--device", "cpu"])
    assert rc == 0
    model = load_model(path, device="cpu", progress=False)
    tok = model.tokenizer
    first = complete(model.new_session(), tok.apply_chat_template([{"role": "user", "content": "Hello there"}]),
                     SamplingParams(), 5)
    second = complete(model.new_session(), tok.apply_chat_template([
        {"role": "user", "content": "Hello there"}, {"role": "assistant", "content": first.text},
        {"role": "user", "content": "And again"}]), SamplingParams(), 5)
    assert capsys.readouterr().out == first.text + "\n" + second.text + "\n"
