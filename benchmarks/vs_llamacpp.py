"""unmask against llama.cpp's `llama-diffusion-cli` on CPU: same random weights, prompt and settings.

    python -m benchmarks.vs_llamacpp                                  # LLaDA d1024x12, f32 + bf16, 1 thread
    python -m benchmarks.vs_llamacpp --families llada,llada_moe,dream,rnd1 --threads 1,2 --batch 1,16 \\
        --json benchmarks/results/cpu_vs_llamacpp.json

What it does, each step cached under --cache-dir (default ~/.cache/unmask-llamacpp, outside the repository):
1. llama.cpp: `pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36` (the sdist vendors llama.cpp),
   then cmake (Release, GGML_NATIVE=ON: this CPU's vector extensions) building only `llama-diffusion-cli`.
2. Random checkpoints (engine/random_checkpoint.py, byte-level tokenizer so llama.cpp's "gpt2" tokenizer reads
   it), converted with llama.cpp's own convert_hf_to_gguf.py (its vendored gguf-py) to f32 and bf16 GGUF.
   Two things the converter cannot take from a random checkpoint are patched in its process only: the
   pre-tokenizer hash (ours is unknown to it; we name "gpt-2", whose split equals ours on the prompt used:
   words and punctuation, no digits or apostrophes) and LLaDA-MoE's hard-coded mask id 156895 (our 32000-token
   vocabulary has the mask at the tokenizer's id, which the converter also writes). Dream's converter goes
   straight to its BPE path (the checkpoint has no sentencepiece model; that path is what it falls back to).
3. Timing, interleaved (llama.cpp, then unmask, --repeats times, best of each): llama.cpp's own "total time"
   of the diffusion loop (model load excluded), unmask's LLM.generate wall time after one warm-up request.
   tokens/s = generated tokens / seconds. llama.cpp's CLI decodes one sequence; "batch N" for it is N sequences
   one after another (its rate is the batch-1 rate), for unmask one engine batch of N requests.

Greedy, made comparable: in llama.cpp's diffusion sampler `--temp 0` only drops the temperature stage; its chain
still ends in the `dist` sampler, which *samples* from the softmax. `--top-k 1` makes it argmax, and then every
candidate's probability is 1 (dist renormalises one candidate), so the confidence ordering is all ties and the
block schedule commits the leftmost masked positions of the block (ties break by position). Token agreement is
therefore checked against that exact rule run on unmask's forward pass (`llamacpp_greedy` below: argmax, the
leftmost `n` masked positions of the block, llama.cpp's per-step counts, the Dream/RND1 logit shift): same weights,
same prompt ids, so every generated token should agree. unmask's timed runs use its own greedy decoding
(low_confidence, same block/steps: one forward over the 128-token canvas per step, like llama.cpp).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

LLAMA_CPP_PYTHON = "0.3.36"
DEFAULT_CACHE = Path(os.environ.get("UNMASK_LLAMACPP_CACHE", Path.home() / ".cache" / "unmask-llamacpp"))
CLI_TARGET = "llama-diffusion-cli"

# d1024 x 12, 16 heads, MLP 2816, vocab 32000 (issue 21); the MoE shapes have the dense MLP's active FLOPs:
# top-8 of 64 experts of width 352 (8 * 352 = 2816).
SHAPES: dict[str, dict[str, Any]] = {
    "llada": dict(hidden_size=1024, num_layers=12, num_heads=16, intermediate_size=2816, vocab_size=32000),
    "llada_moe": dict(hidden_size=1024, num_layers=12, num_heads=16, num_experts=64, top_k=8,
                      moe_intermediate_size=352, vocab_size=32000),
    "dream": dict(hidden_size=1024, num_layers=12, num_heads=16, num_kv_heads=8, intermediate_size=2816,
                  vocab_size=32000),
    "rnd1": dict(hidden_size=1024, num_layers=12, num_heads=16, num_kv_heads=8, num_experts=64, top_k=8,
                 moe_intermediate_size=352, vocab_size=32000),
}
PROMPT_WORDS = ("The quick brown fox jumps over the lazy dog. A masked diffusion language model predicts every "
                "masked token at once and commits the most confident ones, step after step, until no mask is "
                "left. Once upon a time there was a little robot who wanted to learn how to write poems about "
                "the sea, the sky, the mountains and the rivers. Every morning it read a book and every evening "
                "it wrote a line.")


def log(msg: str) -> None:
    print(f"[vs_llamacpp] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default="llada", help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma list of float32, bfloat16")
    p.add_argument("--caches", default="none,dual", help="unmask cache modes (comma list of none, prefix, dual)")
    p.add_argument("--threads", default="1", help="comma list of thread counts")
    p.add_argument("--batch", default="1", help="comma list of unmask batch sizes")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each side (best is reported)")
    p.add_argument("--layers", type=int, help="override the number of layers (quick checks)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="parallel build jobs")
    p.add_argument("--json", type=Path, help="write the result rows here")
    args = p.parse_args(argv)
    args.families = _choices(p, "--families", args.families, tuple(SHAPES))
    args.dtypes = _choices(p, "--dtypes", args.dtypes, ("float32", "bfloat16"))
    args.caches = _choices(p, "--caches", args.caches, ("none", "prefix", "dual"))
    args.threads = _ints(p, "--threads", args.threads)
    args.batch = _ints(p, "--batch", args.batch)
    for name in ("prompt_len", "gen_len", "block_length", "steps", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if (args.gen_len % args.block_length or args.prompt_len % args.block_length
            or args.steps % (args.gen_len // args.block_length)):
        p.error("--gen-len and --prompt-len must be multiples of --block-length, and --steps a multiple of the "
                "number of generated blocks (llama.cpp's block schedule asserts the canvas and steps divide)")
    return args


def _choices(p: argparse.ArgumentParser, flag: str, value: str, allowed: tuple[str, ...]) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        p.error(f"{flag}: {', '.join(bad) or 'empty'} not in {', '.join(allowed)}")
    return items


def _ints(p: argparse.ArgumentParser, flag: str, value: str) -> list[int]:
    try:
        items = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        p.error(f"{flag}: expected a comma list of integers, got {value!r}")
    if not items or min(items) < 1:
        p.error(f"{flag}: values must be >= 1")
    return items


# ------------------------------------------------------------------------------------------------- llama.cpp build

def llamacpp_source(cache: Path) -> Path:
    """The llama.cpp tree vendored in llama-cpp-python's sdist (downloaded and extracted once)."""
    src = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    if (src / "convert_hf_to_gguf.py").exists():
        return src
    cache.mkdir(parents=True, exist_ok=True)
    sdist = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.exists():
        log(f"downloading llama-cpp-python=={LLAMA_CPP_PYTHON} (sdist)")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(cache)], check=True)
    log(f"extracting {sdist.name}")
    with tarfile.open(sdist) as tar:
        tar.extractall(cache, filter="data")
    return src


def cmake_commands(src: Path, build: Path, jobs: int) -> list[list[str]]:
    """Configure (Release, native CPU flags, no network/server/tests) and build the diffusion CLI only."""
    configure = ["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
                 "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TOOLS=OFF",
                 "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_EXAMPLES=ON", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF"]
    return [configure, ["cmake", "--build", str(build), "--target", CLI_TARGET, "-j", str(jobs)]]


def build_cli(cache: Path, jobs: int) -> tuple[Path, Path]:
    """-> (llama.cpp source dir, path of llama-diffusion-cli), building it when it is not there yet."""
    src = llamacpp_source(cache)
    build = cache / f"build-{LLAMA_CPP_PYTHON}"
    cli = build / "bin" / CLI_TARGET
    if not cli.exists():
        for cmd in cmake_commands(src, build, jobs):
            log("running: " + " ".join(cmd))
            subprocess.run(cmd, check=True)
    return src, cli


# ------------------------------------------------------------------------------------------------- checkpoints

_CONVERT = r"""
import sys, runpy
src, family = sys.argv[1], sys.argv[2]
sys.argv = [src + "/convert_hf_to_gguf.py"] + sys.argv[3:]
sys.path.insert(0, src)
from conversion import base
known = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        return "gpt-2"   # our random tokenizer's split; equal to GPT-2's on words and punctuation
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
if family == "llada_moe":
    from conversion import llada
    params = llada.LLaDAMoEModel.set_gguf_parameters
    def set_gguf_parameters(self):
        real = self.gguf_writer.add_mask_token_id
        self.gguf_writer.add_mask_token_id = lambda _id: None   # keep the tokenizer's mask id (not 156895)
        try:
            params(self)
        finally:
            self.gguf_writer.add_mask_token_id = real
    llada.LLaDAMoEModel.set_gguf_parameters = set_gguf_parameters
if family == "dream":
    from conversion import dream   # no tokenizer.model: straight to the BPE path (needs no sentencepiece)
    dream.DreamModel.set_vocab = lambda self: self._set_vocab_gpt2()
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def write_checkpoint(family: str, out: Path, layers: int | None = None) -> Path:
    """A random checkpoint of `family` in the benchmark shape, in the form both loaders take."""
    from engine.random_checkpoint import write_random_checkpoint
    shape = dict(SHAPES[family])
    if layers:
        shape["num_layers"] = layers
    if (out / "config.json").exists():  # deterministic in the shape (seed 0): written once
        return plain_chat_template(out)
    path = write_random_checkpoint(out, family, byte_level=True, **shape)
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("auto_map", None)  # no remote code here: transformers would ask to run it
    if family == "rnd1":
        cfg["architectures"] = ["RND1"]  # the name llama.cpp's converter registers (RND1LM is the HF class)
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    tok_cfg["add_bos_token"] = family == "llada"  # what llama.cpp will do (its LLaDA converter forces BOS)
    (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    return plain_chat_template(path)


PLAIN_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"


def plain_chat_template(path: Path) -> Path:
    """llama-diffusion-cli always formats `-p` with the model's chat template (`enable_chat_template` defaults to
    true and no flag of that example turns it off); a template that renders just the message keeps its prompt the
    raw text both sides tokenize. GGUFs converted with another template are stale and removed."""
    tok_path = path / "tokenizer_config.json"
    tok_cfg = json.loads(tok_path.read_text())
    if tok_cfg.get("chat_template") != PLAIN_TEMPLATE:
        tok_cfg["chat_template"] = PLAIN_TEMPLATE
        tok_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")
        (path / "chat_template.jinja").unlink(missing_ok=True)
        for stale in path.glob("*.gguf"):
            stale.unlink()
    return path


def gguf_name(family: str, outtype: str) -> str:
    return f"{family}-{outtype}.gguf"


def convert(src: Path, family: str, ckpt: Path, outtype: str) -> Path:
    """convert_hf_to_gguf.py ckpt --outtype f32|bf16 -> ckpt/<family>-<outtype>.gguf (kept when present)."""
    out = ckpt / gguf_name(family, outtype)
    if not out.exists():
        log(f"converting {family} to {outtype} GGUF")
        subprocess.run([sys.executable, "-c", _CONVERT, str(src), family, str(ckpt), "--outtype", outtype,
                        "--outfile", str(out)], check=True, stdout=subprocess.DEVNULL)
    return out


def prompt_ids(tokenizer: Any, n: int, bos: int | None) -> tuple[str, list[int]]:
    """A prompt text of exactly n tokens (counting the BOS llama.cpp adds for LLaDA) and its ids."""
    words = PROMPT_WORDS.split(" ")
    want = n - (bos is not None)
    text = ""
    for w in (words * (1 + 4 * n // len(words))):
        cand = (text + " " + w) if text else w
        ids = tokenizer.encode(cand, add_special_tokens=False)
        if len(ids) > want:
            break
        text = cand
    ids = tokenizer.encode(text, add_special_tokens=False)
    while len(ids) < want:  # pad with single-character pieces
        text += "."
        ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != want:
        raise RuntimeError(f"could not build a {n}-token prompt (got {len(ids)} tokens)")
    return text, ([bos] if bos is not None else []) + ids


# ------------------------------------------------------------------------------------------------- runs

@dataclass
class Row:
    family: str
    dtype: str
    threads: int
    batch: int
    cache: str
    llamacpp_tok_s: float
    unmask_tok_s: float
    ratio: float
    agree: int | None = None
    text_agree: int | None = None
    gen: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def llamacpp_steps(args: argparse.Namespace) -> int:
    """llama.cpp's `--diffusion-steps` for the same schedule as unmask's `steps`. Its block schedule splits the steps
    over max_length / block_length blocks of the WHOLE canvas (prompt included) but starts the blocks at the
    prompt's end, so the blocks past the canvas are empty and their steps are skipped: `--diffusion-steps 32` on a
    64 + 64 canvas with blocks of 32 runs 8 forwards per block, 16 in all, not 32. Scaling by canvas / gen gives it
    the reference's steps per generated block (steps / (gen / block)) and so the same forwards and per-step counts."""
    canvas = args.prompt_len + args.gen_len
    return args.steps * canvas // args.gen_len


def llamacpp_command(cli: Path, gguf: Path, prompt: str, args: argparse.Namespace, threads: int) -> list[str]:
    canvas = args.prompt_len + args.gen_len
    return [str(cli), "-m", str(gguf), "-p", prompt, "-ub", str(canvas), "-b", str(canvas), "-c", str(canvas),
            "--diffusion-steps", str(llamacpp_steps(args)), "--diffusion-block-length", str(args.block_length),
            "--temp", "0", "--top-k", "1", "--seed", "0", "-t", str(threads), "-tb", str(threads)]


_TOTAL = re.compile(r"total time: ([0-9.]+)ms")
_LOG_PREFIX = re.compile(r"^\d+\.\d+\.\d+\.\d+ [A-Z] ")


def parse_llamacpp(out: str) -> tuple[float, str]:
    """-> (seconds of the diffusion loop, generated text) from the CLI's output."""
    m = _TOTAL.search(out)
    if m is None:
        raise RuntimeError("llama-diffusion-cli printed no 'total time' line:\n" + out[-2000:])
    rest = out[m.end():]
    rest = rest[rest.index("\n") + 1:] if "\n" in rest else ""
    rest = _LOG_PREFIX.sub("", rest, count=1)  # "0.06.796.228 I " when its log carries timestamps
    text = rest[1:] if rest.startswith("\n") else rest
    return float(m.group(1)) / 1e3, text[:-1] if text.endswith("\n") else text


def run_llamacpp(cmd: list[str]) -> tuple[float, str]:
    res = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    if res.returncode != 0:
        raise RuntimeError(f"{cmd[0]} exited {res.returncode}:\n{res.stderr[-2000:]}")
    return parse_llamacpp(res.stdout + res.stderr if _TOTAL.search(res.stdout) is None else res.stdout)


def llamacpp_greedy(model: Any, prompt: list[int], gen: int, block: int, steps: int) -> list[int]:
    """llama.cpp's `--top-k 1` diffusion loop on unmask's forward: argmax at every masked position of the block,
    commit the leftmost n of them, n from its even per-step split; logits shifted for Dream/RND1."""
    import torch
    mask = model.config.mask_id
    x = torch.tensor([prompt + [mask] * gen])  # [1, L]
    n_blocks = gen // block
    per_block = steps // n_blocks
    for b in range(n_blocks):
        lo, hi = len(prompt) + b * block, len(prompt) + (b + 1) * block
        count = int((x[0, lo:hi] == mask).sum())
        split = [count // per_block + (i < count % per_block) for i in range(per_block)]
        for n in split:
            logits = model.logits(x)[0]  # [L, V]
            if model.config.shift_logits:
                logits = torch.cat([logits[:1], logits[:-1]])
            masked = (x[0, lo:hi] == mask).nonzero()[:, 0] + lo
            if masked.numel() == 0:
                break
            take = masked[:n]
            x[0, take] = logits[take].argmax(-1)
    return x[0, len(prompt):].tolist()


def agreement(a: list[int], b: list[int]) -> int:
    return sum(int(i == j) for i, j in zip(a, b))


def text_agreement(tokenizer: Any, ids: list[int], text: str) -> int:
    """How many of `ids`, decoded piece by piece, match llama.cpp's text in order (up to the first mismatch)."""
    pos = 0
    for n, i in enumerate(ids):
        piece = tokenizer.decode([i], skip_special_tokens=True)
        if not text.startswith(piece, pos):
            return n
        pos += len(piece)
    return len(ids)


def time_unmask(llm: Any, prompts: list[list[int]], params: Any) -> tuple[float, list[list[int]]]:
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    return time.perf_counter() - t0, [list(o.token_ids) for o in outs]


def bench_family(family: str, args: argparse.Namespace, src: Path, cli: Path, work: Path) -> list[Row]:
    import torch
    from tqdm import tqdm
    from engine import LLM, SamplingParams
    ckpt = write_checkpoint(family, work / f"{family}-L{args.layers or SHAPES[family]['num_layers']}", args.layers)
    rows: list[Row] = []
    for dtype in args.dtypes:
        gguf = convert(src, family, ckpt, {"float32": "f32", "bfloat16": "bf16"}[dtype])
        llm = LLM(str(ckpt), dtype=dtype)
        tok = llm.model.tokenizer
        bos = tok.bos_token_id if family == "llada" else None
        text, ids = prompt_ids(tok, args.prompt_len, bos)
        ref = llamacpp_greedy(llm.model, ids, args.gen_len, args.block_length, args.steps)
        for threads in args.threads:
            torch.set_num_threads(threads)
            cmd = llamacpp_command(cli, gguf, text, args, threads)
            log("llama.cpp: " + " ".join(cmd[:3] + ["-p", "<prompt>"] + cmd[5:]))
            for cache in args.caches:
                params = SamplingParams(max_tokens=args.gen_len, block_length=args.block_length, steps=args.steps,
                                        temperature=0.0, cache=cache, ignore_eos=True, algorithm="llada")
                for batch in args.batch:
                    prompts = [ids] * batch
                    time_unmask(llm, prompts[:1], params)  # warm-up: the first request after load
                    best_l = best_u = float("inf")
                    l_text = ""
                    bar = tqdm(range(args.repeats), desc=f"{family} {dtype} t{threads} {cache} b{batch}",
                               file=sys.stderr)
                    for _ in bar:
                        sec, l_text = run_llamacpp(cmd)
                        best_l = min(best_l, sec)
                        sec_u, _ = time_unmask(llm, prompts, params)
                        best_u = min(best_u, sec_u)
                        bar.set_postfix(llamacpp=f"{args.gen_len / best_l:.1f}",
                                        unmask=f"{batch * args.gen_len / best_u:.1f}")
                    l_rate = args.gen_len / best_l
                    u_rate = batch * args.gen_len / best_u
                    row = Row(family, dtype, threads, batch, cache, l_rate, u_rate, u_rate / l_rate,
                              gen=args.gen_len)
                    row.text_agree = text_agreement(tok, ref, l_text)
                    row.agree = row.text_agree
                    rows.append(row)
                    print(format_row(row), flush=True)
        del llm
    return rows


def format_row(r: Row) -> str:
    agree = "" if r.agree is None else f"{r.agree}/{r.gen}"
    return (f"| {r.family} | {r.dtype} | {r.threads} | {r.batch} | {r.cache} | {r.llamacpp_tok_s:.1f} | "
            f"{r.unmask_tok_s:.1f} | {r.ratio:.2f}x | {agree} |")


HEADER = ("| family | dtype | threads | batch | unmask cache | llama.cpp tok/s | unmask tok/s | unmask / llama.cpp | "
          "tokens agree |\n|---|---|---:|---:|---|---:|---:|---:|---:|")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    src, cli = build_cli(args.cache_dir, args.jobs)
    work = args.cache_dir / "checkpoints"
    print(HEADER, flush=True)
    rows: list[Row] = []
    for family in args.families:
        rows += bench_family(family, args, src, cli, work)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")


if __name__ == "__main__":
    main()
