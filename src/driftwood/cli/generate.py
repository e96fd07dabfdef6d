"""``driftwood generate`` and ``driftwood chat``: run the inference engine from the shell."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from driftwood.errors import DriftwoodError

DEFAULT_MAX_TOKENS = 256


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="model name (smollm2) or GGUF path")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: the device's fastest; see docs/engine.md)")
    p.add_argument("--weights", default="auto", choices=["auto", "dense", "quant", "hybrid"],
                   help="how weights are held (default auto; see docs/engine.md)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step with torch.compile: faster tokens after a slow "
                   "start (~15 s with a warm cache, minutes cold)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)


def register(subparsers: Any) -> None:
    gen = subparsers.add_parser("generate", help="generate text from a prompt",
                                description="Stream a continuation of a prompt.")
    _add_model_arguments(gen)
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text (special tokens parsed, BOS per the model)")
    source.add_argument("--prompt-ids", help="prompt as comma-separated token ids")
    gen.add_argument("--json", action="store_true",
                     help="print one JSON object (prompt_ids, output_ids, text, timings)")
    gen.set_defaults(func=run_generate)

    chat = subparsers.add_parser("chat", help="chat interactively with a model",
                                 description="Chat with the model's chat template. "
                                 "Commands: /reset, /exit.")
    _add_model_arguments(chat)
    chat.add_argument("--system", default=None, help="system message")
    chat.set_defaults(func=run_chat)


def _params(args: argparse.Namespace):
    from driftwood.model import SamplingParams

    try:
        return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              min_p=args.min_p, repetition_penalty=args.repeat_penalty,
                              frequency_penalty=args.frequency_penalty,
                              presence_penalty=args.presence_penalty)
    except ValueError as exc:
        raise DriftwoodError(str(exc)) from None


def _load(args: argparse.Namespace):
    from driftwood.model import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype, weights=args.weights,
                      compile=args.compile, progress=True)


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise DriftwoodError(f"--prompt-ids must be comma-separated integers: {text!r}") from None
    if not ids:
        raise DriftwoodError("--prompt-ids is empty")
    return ids


def run_generate(args: argparse.Namespace) -> int:
    from driftwood.model.generate import generate

    params = _params(args)
    ids = _parse_ids(args.prompt_ids) if args.prompt_ids is not None else None
    model = _load(args)
    if ids is None:
        ids = model.tokenizer.encode(args.prompt)
    elif any(not 0 <= i < model.config.vocab_size for i in ids):
        raise DriftwoodError(f"--prompt-ids needs token ids in [0, {model.config.vocab_size})")
    session = model.new_session(capacity=min(model.config.context_length,
                                             len(ids) + args.max_tokens), seed=args.seed)
    output: list[int] = []
    parts: list[str] = []
    last = None
    for last in generate(session, ids, params, args.max_tokens):
        if last.token is not None:
            output.append(last.token)
        parts.append(last.text)
        if not args.json and last.text:
            sys.stdout.write(last.text)
            sys.stdout.flush()
    assert last is not None
    stats = last.stats.as_dict()
    if args.json:
        print(json.dumps({
            "model": str(model.path), "device": str(model.device),
            "dtype": str(model.dtype).removeprefix("torch."), "weights": model.weights,
            "prompt_ids": ids, "output_ids": output, "text": "".join(parts),
            "finish_reason": last.finish_reason, "timings": stats,
        }, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        print(f"[{stats['prompt_tokens']} prompt tokens in {stats['prefill_s'] * 1e3:.0f} ms, "
              f"{stats['generated_tokens']} generated at {stats['decode_ms_per_token']:.1f} ms/token, "
              f"{last.finish_reason}]", file=sys.stderr)
    session.close()
    return 0


def run_chat(args: argparse.Namespace) -> int:
    from driftwood.model.generate import generate

    params = _params(args)
    model = _load(args)
    session = model.new_session(seed=args.seed)
    messages: list[dict[str, str]] = [] if args.system is None else [
        {"role": "system", "content": args.system}]
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            messages = messages[:1] if args.system is not None else []
            session.reset()
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        ids = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        # reuse the cached prefix the session already holds; feed only what is new
        keep = next((i for i, (a, b) in enumerate(zip(session.tokens, ids, strict=False)) if a != b),
                    min(len(session.tokens), len(ids)))
        keep = min(keep, len(ids) - 1)
        session.truncate(keep)
        reply: list[str] = []
        max_tokens = min(args.max_tokens, session.capacity - len(ids))
        if max_tokens <= 0:
            raise DriftwoodError("the conversation no longer fits the context; /reset to start over")
        for chunk in generate(session, ids[keep:], params, max_tokens):
            reply.append(chunk.text)
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
