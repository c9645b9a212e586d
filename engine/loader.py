"""load_model: a local Hugging Face checkpoint directory -> DiffusionModel, with errors that name file and key."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .config import ModelConfig
from .hub import resolve_model_path
from .errors import CheckpointError
from .families import parse_config, stop_token_ids, tensor_mapper
from .loaded_model import DiffusionModel
from .model.parallel import SINGLE, Shard, shard_range
from .model.transformer import Transformer
from .tokenizer import end_of_turn_ids, load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_supports_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_dtype(dtype: str | torch.dtype, device: torch.device | None = None,
                  checkpoint_dtype: str | None = None) -> torch.dtype:
    """A dtype name or torch dtype. "auto": on CPU bfloat16 where the CPU supports it (else float32); elsewhere
    the checkpoint's torch_dtype (float32 if it names none)."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype == "auto":
        if device is None or device.type == "cpu":
            return torch.bfloat16 if cpu_supports_bfloat16() else torch.float32
        return DTYPES.get(checkpoint_dtype or "float32", torch.float32)
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"dtype must be one of {['auto', *sorted(DTYPES)]}, got {dtype!r}")


def checkpoint_dtype(model_dir: Path) -> str | None:
    """config.json's torch_dtype (or dtype), when readable."""
    try:
        raw = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = raw.get("torch_dtype", raw.get("dtype")) if isinstance(raw, dict) else None
    return value if isinstance(value, str) else None


def resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a valid torch device ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
    return dev


def _json_object(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in `path`; CheckpointError naming the file when it is unreadable or not an object."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable {what} ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: {what} must be a JSON object")
    return obj


def read_generation_config(model_dir: Path) -> dict[str, Any]:
    """generation_config.json as a dict ({} when absent)."""
    path = model_dir / "generation_config.json"
    return _json_object(path, "generation config") if path.exists() else {}


def read_config(model_dir: Path) -> ModelConfig:
    path = model_dir / "config.json"
    if not path.exists():
        raise CheckpointError(f"{path}: config.json not found in the checkpoint directory")
    return parse_config(_json_object(path, "config"), str(path))


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: unreadable index, key 'weight_map' ({e})") from None
        files = sorted({model_dir / name for name in weight_map.values()})
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{index}: shard '{f.name}' listed in 'weight_map' does not exist")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir}: no *.safetensors weight files")
    return files


def shard_pieces(name: str, cfg: ModelConfig, shard: Shard) -> list[tuple[int, int, int]] | None:
    """The (dim, start, end) ranges of the checkpoint tensor behind internal parameter `name` that this rank holds,
    concatenated in order along dim; None: the whole tensor (replicated). One range except the fused q/k/v
    projection (LLaDA2's query_key_value: rows of all H query heads, then the KV key heads, then the KV value heads),
    of which a rank holds its query heads, its KV heads' keys and their values."""
    if shard.active and cfg.fused_qkv and name.endswith("attn.qkv_proj.weight"):
        hd = cfg.head_dim
        (h0, h1), (k0, k1) = shard.heads(cfg.num_heads), shard.kv_heads(cfg.num_kv_heads)
        q_rows, kv_rows = cfg.num_heads * hd, cfg.num_kv_heads * hd
        return [(0, h0 * hd, h1 * hd), (0, q_rows + k0 * hd, q_rows + k1 * hd),
                (0, q_rows + kv_rows + k0 * hd, q_rows + kv_rows + k1 * hd)]
    cut = shard_slice(name, cfg, shard)
    return None if cut is None else [cut]


def shard_slice(name: str, cfg: ModelConfig, shard: Shard) -> tuple[int, int, int] | None:
    """(dim, start, end) of the checkpoint tensor behind internal parameter `name` that this rank holds (for a
    stacked expert parameter: of one expert's tensor); None: the whole tensor (replicated)."""
    if not shard.active:
        return None
    hd, leaf = cfg.head_dim, name.rsplit(".", 2)
    part = ".".join(leaf[-2:])
    if name in ("embed.weight", "lm_head.weight"):
        return (0, *shard.vocab(cfg.vocab_size))
    if ".moe.shared." in name:  # shared experts (LLaDA2): sliced by their own width, as dense MLPs are
        cut = shard_range(cfg.shared_expert_size, shard.rank, shard.size)
        return (1 if part == "down_proj.weight" else 0, *cut)
    if part in ("q_proj.weight", "q_proj.bias"):
        h0, h1 = shard.heads(cfg.num_heads)
        return 0, h0 * hd, h1 * hd
    if part in ("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias"):
        k0, k1 = shard.kv_heads(cfg.num_kv_heads)
        return 0, k0 * hd, k1 * hd
    if part == "o_proj.weight":
        h0, h1 = shard.heads(cfg.num_heads)
        return 1, h0 * hd, h1 * hd
    if part in ("gate_proj.weight", "up_proj.weight"):
        return (0, *shard_range(cfg.intermediate_size, shard.rank, shard.size))
    if part == "down_proj.weight":
        return (1, *shard_range(cfg.intermediate_size, shard.rank, shard.size))
    if part in ("moe.w_gate", "moe.w_up", "moe.w_down"):
        i0, i1 = shard.moe_inter(cfg.moe_intermediate_size)
        return 1 if part == "moe.w_down" else 0, i0, i1
    return None


def load_weights(net: Transformer, cfg: ModelConfig, files: list[Path], model_dir: Path,
                 shard: Shard = SINGLE) -> None:
    """Copy every checkpoint tensor into `net`; a sharded net reads only its rank's slices (safetensors get_slice),
    so no rank holds the whole model. Shapes are checked against the full (unsharded) model."""
    mapper = tensor_mapper(cfg.family)
    params = dict(net.named_parameters())
    if cfg.tie_embeddings:
        params.pop("lm_head.weight", None)
    with torch.device("meta"):
        full = dict(Transformer(cfg).named_parameters()) if shard.active else params
    e0, e1 = shard.experts(cfg.num_experts)
    expected: set[tuple[str, int | None]] = set()
    for name, p in params.items():
        stacked = name.endswith((".moe.w_gate", ".moe.w_up", ".moe.w_down"))
        expected.update((name, e) for e in range(e0, e1)) if stacked else expected.add((name, None))
    seen: dict[tuple[str, int | None], str] = {}
    for file in files:
        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for a corrupt header
            raise CheckpointError(f"{file}: unreadable safetensors file ({e})") from None
        with handle:
            for key in handle.keys():
                target = mapper(key)
                slot = None if target is None else (target.name, target.expert)
                if slot not in expected:
                    if cfg.tie_embeddings and target is not None and target.name == "lm_head.weight":
                        continue
                    if target is not None and target.expert is not None and target.name in params \
                            and 0 <= target.expert < cfg.num_experts:
                        continue  # another rank's expert (expert parallel)
                    raise CheckpointError(f"{file}: unexpected tensor '{key}' for a {cfg.family} checkpoint "
                                          f"with this config")
                if slot in seen:
                    raise CheckpointError(f"{file}: tensor '{key}' also appears in {seen[slot]}")
                param = params[target.name]
                dest = param.data if target.expert is None else param.data[target.expert - e0]
                full_shape = full[target.name].shape[1:] if target.expert is not None else full[target.name].shape
                view = handle.get_slice(key)
                if tuple(view.get_shape()) != tuple(full_shape):
                    raise CheckpointError(f"{file}: tensor '{key}' has shape {list(view.get_shape())} but "
                                          f"config.json implies {list(full_shape)}")
                pieces = shard_pieces(target.name, cfg, shard)
                if pieces is None:
                    dest.copy_(view[:])
                else:
                    at = 0
                    for dim, a, b in pieces:
                        part = view[a:b] if dim == 0 else view[:, a:b]
                        dest.narrow(dim, at, b - a).copy_(part)
                        at += b - a
                    if dest.shape[dim] > at:  # vocabulary padding of the last rank's chunk
                        dest.narrow(dim, at, dest.shape[dim] - at).zero_()
                seen[slot] = file.name
    missing = sorted(expected - seen.keys(), key=str)
    if missing:
        names = [_checkpoint_name(cfg, n, e) for n, e in missing[:5]]
        raise CheckpointError(f"{model_dir}: missing tensor(s) {', '.join(repr(n) for n in names)}"
                              f"{f' and {len(missing) - 5} more' if len(missing) > 5 else ''}")


def _checkpoint_name(cfg: ModelConfig, internal: str, expert: int | None) -> str:
    """Best-effort reverse mapping, for error messages."""
    mapper = tensor_mapper(cfg.family)
    layer = internal.split(".")[1] if internal.startswith("layers.") else "0"
    stems = (["model.transformer.wte.weight", "model.transformer.ln_f.weight", "model.transformer.ff_out.weight"]
             + [f"model.transformer.blocks.{layer}.{s}" for s in (
                 "attn_norm.weight", "ff_norm.weight", "attn_out.weight", "ff_proj.weight", "up_proj.weight",
                 "ff_out.weight", *[f"{p}_proj.{w}" for p in "qkv" for w in ("weight", "bias")])]
             + ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
             + [f"model.layers.{layer}.{s}" for s in (
                 "input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_norm.weight",
                 "self_attn.k_norm.weight", "mlp.gate.weight",
                 *[f"self_attn.{p}_proj.{w}" for p in "qkvo" for w in ("weight", "bias")],
                 *[f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")],
                 *[f"mlp.experts.{expert}.{p}_proj.weight" for p in ("gate", "up", "down")])])
    for stem in stems:
        t = mapper(stem)
        if t is not None and t.name == internal and t.expert == expert:
            return stem
    return internal


def load_model(model_dir: str | Path, device: str | torch.device = "cpu",
               dtype: str | torch.dtype = "float32", shard: Shard = SINGLE, kernels: str | None = None) -> DiffusionModel:
    """Load a LLaDA / LLaDA-MoE / Dream / RND1 / LLaDA2 checkpoint directory (config.json, safetensors, tokenizer
    files), or a Hugging Face repo id such as "GSAI-ML/LLaDA-8B-Instruct" (the local cache first; see engine/hub.py).
    dtype: float32, bfloat16, float16 or "auto" (see resolve_dtype). With a Shard, only this rank's slices are read
    (torch.distributed must already be initialised).
    kernels: "auto" | "triton" | "torch" (None: $UNMASK_KERNELS, else auto); see kernels/dispatch.py."""
    from kernels.dispatch import resolve_kernels
    dev = resolve_device(device)
    from .model.fuse import fuse_projections
    from .head_linear import thin_head
    from .shape_buckets import bucket_linears, pack_linears
    backend = resolve_kernels(kernels, dev)
    model_dir = resolve_model_path(model_dir)  # a directory, or a Hugging Face repo id (engine/hub.py)
    torch_dtype = resolve_dtype(dtype, dev, checkpoint_dtype(model_dir) if dtype == "auto" else None)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: checkpoint directory does not exist")
    cfg = read_config(model_dir)
    files = weight_files(model_dir)
    tokenizer = load_tokenizer(model_dir)
    gen_cfg = read_generation_config(model_dir)
    gen_eos = stop_token_ids(gen_cfg.get("eos_token_id"), str(model_dir / "generation_config.json"), "eos_token_id",
                             cfg.vocab_size)
    turn = [i for i in end_of_turn_ids(tokenizer) if i < cfg.vocab_size] if tokenizer is not None else []
    cfg.stop_ids = tuple(dict.fromkeys([*cfg.stop_ids, *gen_eos, *turn]))  # EOS first, no duplicates
    if shard.active:
        shard.check(cfg.num_heads, cfg.num_kv_heads, cfg.num_experts, str(model_dir))
    with torch.device("meta"):
        net = Transformer(cfg, shard)
    net = net.to_empty(device="cpu").to(torch_dtype)
    if cfg.tie_embeddings:  # to_empty gives every module its own storage: tie the head to the embedding again
        net.lm_head.weight = net.embed.weight
    load_weights(net, cfg, files, model_dir, shard)
    net.rotary.reset()
    net = net.to(dev).eval().requires_grad_(False)
    fuse_projections(net)  # one GEMM for q/k/v and one for gate/up (engine/model/fuse.py)
    if dev.type != "cuda":  # a bounded set of GEMM row counts (engine/shape_buckets.py); 16-bit GEMMs in float32
        bucket_linears(net)  # slices where the CPU has no native ones (engine/model/upcast.py's linear)
        thin_head(net)  # the head's few decoded rows through the thin-GEMM kernel, unpadded (engine/head_linear.py)
        pack_linears(net)  # weights oneDNN multiplies kept in its blocked layout (engine/model/upcast.py's packs)
        from .model.cpu_kernel import available
        available()  # build (or find cached) the CPU kernel now, not in the first request
        from .host_memory import keep_freed_pages
        keep_freed_pages()  # a step's large temporaries reuse their pages instead of faulting them in each step
    return DiffusionModel(net, cfg, tokenizer, dev, torch_dtype, model_dir, kernels=backend)
