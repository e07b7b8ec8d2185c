"""``python -m phi3_lightning generate``: complete a prompt, or chat, with a checkpoint."""

from __future__ import annotations

import sys

from . import UsageError, command_parser


def main(argv: list[str]) -> int:
    p = command_parser(
        "generate", "Complete a prompt, or chat, with a Lightning checkpoint or a Hugging Face directory."
    )
    p.add_argument(
        "--checkpoint",
        type=str,
        required=True,
        help="a Lightning .ckpt written by fit, an FSDP2 checkpoint directory, or a Hugging Face directory",
    )
    p.add_argument("--prompt", type=str | None, default=None, help="text to complete (or, with --chat, the user turn)")
    p.add_argument(
        "--chat",
        action="store_true",
        help="render the prompt as a user turn in the chat template; without --prompt chat on stdin",
    )
    p.add_argument("--system", type=str | None, default=None, help="system message for --chat")
    p.add_argument("--max_new_tokens", type=int, default=64, help="tokens to generate at most")
    p.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--top_k", type=int | None, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top_p", type=float | None, default=None, help="nucleus sampling mass")
    p.add_argument(
        "--echo_prompt",
        type=bool,
        default=True,
        help="print the prompt before its completion (with --chat: as 'user> ...' / 'assistant> ...' "
        "lines); --echo_prompt false prints only the generated text",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    p.add_argument(
        "--tokenizer",
        type=str | None,
        default=None,
        help="'byte' or a directory with tokenizer.json; default: the one recorded with the checkpoint",
    )
    p.add_argument(
        "--attn_implementation",
        type=str | None,
        default=None,
        help="eager, sdpa, flash_attention_2 or flex; default: the checkpoint's",
    )
    p.add_argument("--device", type=str, default="auto", help="cpu, cuda, cuda:1 ...; auto = cuda if available")
    p.add_argument(
        "--dtype",
        type=str | None,
        default=None,
        help="float32, bfloat16 or float16; default: bfloat16 on a GPU that supports it, else float32",
    )
    args = p.parse_args(argv)

    import torch

    from ..data.chat import chat_text
    from ..data.tokenizer import check_vocab_fits, load_tokenizer
    from ..modules.loading import load_head

    if args.prompt is None and not args.chat:
        raise UsageError("generate needs --prompt TEXT (or --chat to talk on stdin)")
    from ..model.generation import check_generation_args

    check_generation_args(
        args.max_new_tokens, args.do_sample, args.temperature, args.top_k, args.top_p
    )  # before loading
    device = _device(args.device)
    dtype = args.dtype
    if dtype is None:
        dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    loaded = load_head(args.checkpoint, attn_implementation=args.attn_implementation, device=device, dtype=dtype)
    if loaded.task != "causal_lm":
        raise UsageError(f"{args.checkpoint} holds a {loaded.task} head; generate needs a causal-LM checkpoint")
    spec = args.tokenizer or loaded.tokenizer
    if spec is None:
        raise UsageError(
            f"no tokenizer is recorded with {args.checkpoint}; pass --tokenizer byte or a directory "
            "holding tokenizer.json"
        )
    tokenizer = load_tokenizer(spec)
    check_vocab_fits(tokenizer, loaded.head.config.vocab_size)
    torch.manual_seed(args.seed)

    def complete(text: str) -> str:
        ids = tokenizer.encode(text)
        if not ids:
            ids = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
        x = torch.tensor([ids], device=device)
        out = loaded.head.generate(
            x,
            max_new_tokens=args.max_new_tokens,
            do_sample=args.do_sample,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            eos_token_id=tokenizer.eos_token_ids,
            pad_token_id=tokenizer.pad_token_id,
        )
        new = out[0, len(ids) :].tolist()
        stops = set(tokenizer.eos_token_ids)
        for i, t in enumerate(new):
            if t in stops:
                new = new[:i]
                break
        # The embedding may have more rows than the tokenizer has ids (tiny preset: 512 vs 262 byte ids); an
        # untrained model can sample those rows, which have no text.
        unknown = sum(t >= tokenizer.vocab_size for t in new)
        if unknown:
            print(
                f"note: dropped {unknown} generated id(s) outside the tokenizer's vocab ({tokenizer.vocab_size})",
                file=sys.stderr,
            )
        return tokenizer.decode([t for t in new if t < tokenizer.vocab_size], skip_special_tokens=True)

    chat_format = getattr(tokenizer, "chat_format", "phi3")
    if not args.chat:
        text = complete(args.prompt)
        print(args.prompt + text if args.echo_prompt else text)
        return 0
    messages: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        messages.append({"role": "user", "content": args.prompt})
        reply = complete(chat_text(messages, chat_format, add_generation_prompt=True))
        print(f"user> {args.prompt}\nassistant> {reply}" if args.echo_prompt else reply)
        return 0
    print("chat: type a message, an empty line or Ctrl-D ends", file=sys.stderr)
    while True:
        try:
            line = input("user> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        reply = complete(chat_text(messages, chat_format, add_generation_prompt=True))
        print(f"assistant> {reply}", flush=True)
        messages.append({"role": "assistant", "content": reply})
    return 0


def _device(spec: str) -> str:
    """``--device`` as a device this machine has, checked before the checkpoint is loaded (a UsageError naming it)."""
    import torch

    from ..options import usable_device

    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        usable_device(spec, "auto, cpu, cuda or cuda:N", default="auto")
    except ValueError as e:
        raise UsageError(str(e)) from None
    return spec
