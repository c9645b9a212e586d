"""Driver: same setup as benchmarks.throughput (imported from the tree in cwd), then per mode: the benchmark's
short warm-up, the benchmark's timed run (rep 0), then REPS more timed runs of the same workload.
Prints wall and CPU seconds and tok/s per rep. Extra env: REPS, PROFILE=mode (torch.profiler on the last rep)."""
import os, random, sys, tempfile, time, resource
from pathlib import Path
import torch
import engine
from benchmarks import throughput as tp
from engine import LLM
from engine.kv_pool import kv_bytes_per_token
from engine.llm import read_generation_config
from engine.loader import read_config, resolve_dtype
from engine.sampling_params import model_defaults
from engine.random_checkpoint import write_random_checkpoint

if os.environ.get('NOFUSE'):
    import engine.model.fuse as _f; _f.fuse_projections = lambda net: net
SMX = []
if os.environ.get('WRAPSMX'):
    _sm = torch.softmax
    def _wsm(x, *a, **k):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt; t0 = time.perf_counter()
        y = _sm(x, *a, **k)
        SMX.append((tuple(x.shape), time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0))
        return y
    torch.softmax = _wsm
tp.tqdm = lambda *a, **k: type("B", (), {"update": lambda s, *a: None, "close": lambda s: None})()
args = tp.parse_args()
reps = int(os.environ.get("REPS", "3"))
prof_mode = os.environ.get("PROFILE")
torch.set_num_threads(args.threads)
device = torch.device(args.device)
dtype = args.dtype
d, n_layers = (int(v) for v in args.random.lower().split("x"))
model_dir = write_random_checkpoint(Path(tempfile.mkdtemp()) / "random", "llada", hidden_size=d,
                                    num_layers=n_layers, num_heads=max(d // 64, 1),
                                    intermediate_size=d * 8 // 3 // 64 * 64, vocab_size=args.vocab,
                                    tokenizer=False, seed=args.seed)
n = args.num_prompts or args.batch_size
model_cfg = read_config(Path(model_dir))
defaults = model_defaults(model_cfg.family, read_generation_config(Path(model_dir)))
args.gen_len = args.gen_len or defaults.max_tokens
canvas = args.prompt_len + args.gen_len
kv_bytes = kv_bytes_per_token(model_cfg, resolve_dtype(dtype))
llm = LLM(model_dir, device=device, dtype=dtype, max_num_seqs=args.batch_size, max_num_batched_tokens=1 << 30,
          kv_cache_memory=kv_bytes * (canvas + 32) * args.batch_size + kv_bytes * 64)
args.block_length = min(args.block_length or llm.defaults.block_length, args.gen_len)
args.steps = args.steps or args.gen_len
rng = random.Random(args.seed)
cfg = llm.model.config
banned = {cfg.mask_id, *cfg.stop_ids}
vocab = [t for t in range(cfg.vocab_size) if t not in banned]
prompts = [[rng.choice(vocab) for _ in range(args.prompt_len)] for _ in range(n)]
print(f"# {engine.__file__} dtype {llm.model.dtype} threads {torch.get_num_threads()} n {n} batch {args.batch_size}")
for mode in args.modes.split(","):
    blk = args.block_length
    wp = tp.engine_params(mode, args, True)
    wp.max_tokens = wp.block_length = wp.steps = blk
    tp.run_engine(llm, prompts[:1], wp, f"warmup-{mode}")
    res_all = []
    for rep in range(reps + 1):
        prof = None
        if prof_mode == mode and rep == reps:
            from torch.profiler import profile, ProfilerActivity
            prof = profile(activities=[ProfilerActivity.CPU], with_stack=False, record_shapes=True)
            prof.__enter__()
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt; t0, c0 = time.perf_counter(), time.thread_time()
        res, forwards = tp.run_engine(llm, prompts, tp.engine_params(mode, args, True), mode)
        wall, cpu = time.perf_counter() - t0, time.thread_time() - c0; flt = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        if prof:
            prof.__exit__(None, None, None)
            prof.export_chrome_trace(os.environ.get("TRACE", "/tmp/p17/trace.json"))
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
            print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=60, max_name_column_width=40, max_shapes_column_width=90))
        if SMX:
            print(f"softmax calls {len(SMX)} total {sum(x[1] for x in SMX)*1e3:.0f} ms faults {sum(x[2] for x in SMX)}; first 8:", [(x[0][0], round(x[1]*1e3,1), x[2]) for x in SMX[:8]])
            SMX.clear()
        tokens = sum(len(r.token_ids) for r in res)
        res_all.append((wall, cpu, tokens, forwards, flt))
        h = hash(tuple(tuple(r.token_ids) for r in res))
    walls = [r[0] for r in res_all]
    print(f"{mode}: tokens {tokens} forwards {forwards} outhash {h & 0xffffffff:08x} | rep0(bench) {tokens/walls[0]:.1f} tok/s | "
          f"later reps tok/s wall: " + " ".join(f"{tokens/w:.1f}" for w in walls[1:]) +
          f" | cpu: " + " ".join(f"{tokens/r[1]:.1f}" for r in res_all) +
          f" | minflt: " + " ".join(str(r[4]) for r in res_all) + f" | best-later {tokens/min(walls[1:]) if reps else 0:.1f}", flush=True)
