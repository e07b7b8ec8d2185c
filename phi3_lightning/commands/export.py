"""``python -m phi3_lightning export``: a Lightning checkpoint -> a Hugging Face directory (or its LoRA adapters alone)."""

from __future__ import annotations

from . import command_parser


def main(argv: list[str]) -> int:
    p = command_parser(
        "export",
        "Write a Lightning checkpoint as a Hugging Face directory (config.json + safetensors) "
        "that transformers' Phi3For* classes load. LoRA adapters are merged into the base weights "
        "(original key names), unless --lora_only.",
    )
    p.add_argument("--checkpoint", type=str, required=True, help="a Lightning .ckpt or FSDP2 checkpoint directory")
    p.add_argument("--output", type=str, required=True, help="the Hugging Face directory to write")
    p.add_argument(
        "--dtype",
        type=str | None,
        default=None,
        help="float32, bfloat16 or float16 for the saved weights; default: as trained",
    )
    p.add_argument("--max_shard_size", type=str, default="5GB", help="largest safetensors shard ('5GB', '500MB')")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument(
        "--lora_only",
        action="store_true",
        help="LoRA checkpoints: write only the adapters (+ layers trained in full) as "
        "adapter_model.safetensors + adapter_config.json instead of the merged model",
    )
    args = p.parse_args(argv)

    from ..modules.loading import export_adapter, export_checkpoint

    if args.lora_only:
        out = export_adapter(args.checkpoint, args.output, dtype=args.dtype, overwrite=args.overwrite)
    else:
        out = export_checkpoint(
            args.checkpoint, args.output, dtype=args.dtype, max_shard_size=args.max_shard_size, overwrite=args.overwrite
        )
    print(f"exported {args.checkpoint} -> {out}")
    return 0
