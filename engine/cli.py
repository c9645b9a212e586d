"""`unmask generate "prompt"`: print the completion from the bundled model (or --model), and the flag groups that
every command loading a model shares (sampling, parallelism, kernels).

The `unmask` command line itself (generate and serve) is server/cli.py; this module runs `generate` alone as
`python -m engine.cli generate ...` (what torchrun starts on every rank), without the server's dependencies."""
from __future__ import annotations

import argparse
import sys
from typing import Any

MASK_SYMBOL = "░"
EOS_SYMBOL = "·"
"""EOS (padding after the answer) in --show-steps; other stop tokens (end-of-turn) show as STOP_SYMBOL."""
STOP_SYMBOL = "⏹"


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """One flag per request field of SamplingParams' schema (engine/param_schema.py)."""
    from .param_schema import add_cli_flags
    add_cli_flags(p.add_argument_group("sampling (unset: the model's defaults)"))


def add_parallel_flags(p: argparse.ArgumentParser) -> None:
    """--tensor-parallel-size / --expert-parallel / --parallel-timeout (shared by `generate` and `serve`); pass
    `parallel_options(args)` on to LLM(...) or AsyncEngine.from_model(...)."""
    g = p.add_argument_group("parallelism (one model over several processes / GPUs)")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N",
                   help="shard the model over N ranks (N-1 worker processes are started; under torchrun, the "
                        "world size)")
    g.add_argument("--expert-parallel", action="store_true",
                   help="MoE models: partition whole experts over the ranks instead of splitting each expert")
    g.add_argument("--parallel-timeout", type=float, default=120.0, metavar="SECONDS",
                   help="a rank silent this long inside a step fails it (default 120)")


PARALLEL_FIELDS = ("tensor_parallel_size", "expert_parallel", "parallel_timeout")


def parallel_options(args: argparse.Namespace) -> dict[str, Any]:
    return {f: getattr(args, f) for f in PARALLEL_FIELDS}


def add_kernel_flag(p: argparse.ArgumentParser) -> None:
    """--kernels and --no-prefix-caching, shared by every command that loads a model (generate, serve)."""
    p.add_argument("--kernels", choices=("auto", "triton", "torch"),
                   help="auto: Triton on CUDA, torch on CPU (default: $UNMASK_KERNELS, else auto); "
                        "triton on CPU needs TRITON_INTERPRET=1")
    p.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help="do not share the KV pages of common prompt prefixes between requests (block-causal "
                        "models such as LLaDA2; other families never share)")


def sampling_fields() -> tuple[str, ...]:
    """The request fields that are flags (SamplingParams' schema)."""
    from .param_schema import api_names
    return api_names()


def sampling_params(args: argparse.Namespace) -> Any:
    from .sampling_params import SamplingParams
    return SamplingParams(**{f: getattr(args, f) for f in sampling_fields()})


def render_canvas(tokenizer: Any, ids: list[int], mask_id: int, eos_id: int, stop_ids: tuple[int, ...]) -> str:
    """Committed runs decoded as text; each masked position shown as MASK_SYMBOL, EOS as EOS_SYMBOL and other stop
    tokens as STOP_SYMBOL."""
    symbols = {mask_id: MASK_SYMBOL, eos_id: EOS_SYMBOL, **{t: STOP_SYMBOL for t in stop_ids if t != eos_id}}
    out, run = [], []
    for t in ids + [None]:
        if t is not None and t not in symbols:
            run.append(t)
            continue
        if run:
            out.append(tokenizer.decode(run, skip_special_tokens=False) if tokenizer else " ".join(map(str, run)))
            run = []
        if t is not None:
            out.append(symbols[t])
    return "".join(out).replace("\n", "⏎")


def cmd_generate(args: argparse.Namespace) -> int:
    from .llm import LLM
    params = sampling_params(args)
    llm = LLM(args.model, device=args.device, dtype=args.dtype, kernels=args.kernels,
              enable_prefix_caching=args.enable_prefix_caching, **parallel_options(args))
    try:
        return _generate(llm, args, params)
    finally:
        llm.shutdown()


def _generate(llm: Any, args: argparse.Namespace, params: Any) -> int:
    prompt: Any = args.prompt
    if args.token_ids:
        prompt = [int(t) for t in args.prompt.replace(",", " ").split()]
    chat = not args.raw and not args.token_ids and getattr(llm.tokenizer, "chat_template", None) is not None
    out = None
    for step, (canvas, final) in enumerate(llm.iter_steps(prompt, params, chat=chat), start=1):
        if args.show_steps:
            cfg = llm.model.config
            print(f"step {step:4d} | {render_canvas(llm.tokenizer, canvas, cfg.mask_id, cfg.eos_id, cfg.stop_ids)}",
                  flush=True)
        out = final
    assert out is not None
    print(out.text if out.text is not None else " ".join(map(str, out.token_ids)))
    if args.stats:
        print(f"[finish={out.finish_reason} steps={out.steps} forward_passes={out.forward_passes} "
              f"tokens={len(out.token_ids)} tokens/forward={out.tokens_per_forward:.2f}]", file=sys.stderr)
    return 0


def add_generate_parser(sub: Any) -> None:
    """Register `generate` on an argparse subparsers object."""
    gen = sub.add_parser("generate", help="generate a completion for one prompt")
    gen.add_argument("prompt", help="prompt text (chat-formatted when the model has a chat template)")
    gen.add_argument("--model", help="checkpoint directory or Hugging Face repo id such as "
                                      "GSAI-ML/LLaDA-8B-Instruct (default: the bundled model)")
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16 (auto: the checkpoint's "
                                                     "torch_dtype; on CPU bfloat16 where the CPU supports it)")
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    gen.add_argument("--token-ids", action="store_true", help="the prompt is a list of token ids, e.g. '1 2 3'")
    gen.add_argument("--show-steps", action="store_true", help=f"print the canvas after every step ({MASK_SYMBOL} mask, {EOS_SYMBOL} EOS, {STOP_SYMBOL} end of turn)")
    gen.add_argument("--stats", action="store_true", help="print steps and forward passes to stderr")
    add_kernel_flag(gen)
    add_sampling_flags(gen)
    add_parallel_flags(gen)
    gen.set_defaults(func=cmd_generate)


def build_parser() -> argparse.ArgumentParser:
    """`generate` only (server/cli.py builds the full `unmask` parser)."""
    parser = argparse.ArgumentParser(prog="unmask", description="Inference engine for masked-diffusion LMs")
    add_generate_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv)


def run_command(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse argv and run the chosen command; errors become one `unmask: error: ...` line and exit status 2 (bad
    input) or 1 (a lost tensor-parallel rank)."""
    # HF_HUB_OFFLINE stays the user's: a Hugging Face repo id may be downloaded (engine/hub.py); tokenizers load
    # local files only
    args = parser.parse_args(argv)
    from .errors import CheckpointError, ParallelError, TokenizerMissingError
    from .sampling_params import SamplingParamsError
    try:
        return args.func(args)
    except SamplingParamsError as e:
        parser.exit(2, f"unmask: error: --{e.field.replace('_', '-')}: {str(e).split(': ', 1)[1]}\n")
    except (CheckpointError, TokenizerMissingError, ValueError, TypeError, MemoryError) as e:
        parser.exit(2, f"unmask: error: {e}\n")
    except ParallelError as e:
        parser.exit(1, f"unmask: error: {e}\n")
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
