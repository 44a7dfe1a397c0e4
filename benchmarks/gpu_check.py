"""The δ-mem core on a CUDA GPU: the chunked scan against the reference loop (correctness and
time), the engine's varlen pool scan captured in a CUDA graph and replayed for other batch
layouts (correctness, and a decode step's time eager against replayed), and the HF runtime's
forward + backward with the state (the training path).

Runs where only torch and transformers are installed (no vLLM): the model is a randomly
initialised one with the default backbone's shape (its config travels; its weights don't
need to). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from deltamem.scan import (
    delta_rule_scan_chunked,
    delta_rule_scan_reference,
    delta_rule_scan_varlen,
    random_inputs,
    random_pool_step,
)


def inputs(B, T, H, r, dtype, device, seed=0):
    return random_inputs(B, T, H, r, dtype=dtype, seed=seed, device=device)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, *args, repeats=5):
    fn(*args)
    sync()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn(*args)
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def graph_check(dev, quick: bool) -> dict:
    """The engine's scan for `layers` layers captured once for N tokens, replayed for other
    layouts copied into the same buffers; max relative error against the loop per replay,
    and one step's time eager and replayed."""
    layers, H, r = (2, 2, 8) if quick else (30, 4, 8)
    N, R = (16, 20) if quick else (64, 130)
    _, _, bufs, pool0 = random_pool_step([N // 2, N // 4], N, R, H, r, torch.float32, 1, dev)
    pools = torch.stack([pool0] * layers)

    def step():
        return [delta_rule_scan_varlen(*bufs, pools[i]) for i in range(layers)]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    t_eager = timed(step)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        reads = step()
    errs = {}
    for name, lens in (("decode", [1] * N), ("mixed", [1, N // 2, 3, N // 4]),
                       ("one", [N - 1])):
        seqs, at, new, pool = random_pool_step(lens, N, R, H, r, torch.float32, len(lens),
                                               dev)
        for buf, x in zip(bufs, new, strict=True):
            buf.copy_(x)
        pools.copy_(torch.stack([pool] * layers))
        graph.replay()
        torch.cuda.synchronize()
        err, t0 = 0.0, 0
        for s, a in zip(seqs, at, strict=True):
            n = s[0].shape[1]
            r_ref, s_ref = delta_rule_scan_reference(*s)
            for i in range(layers):
                err = max(err, ((reads[i][t0:t0 + n] - r_ref[0]).norm() / r_ref.norm()).item(),
                          ((pools[i, a] - s_ref[0]).norm() / s_ref.norm()).item())
            t0 += n
        errs[name] = err
    t_graph = timed(graph.replay)
    return {"layers": layers, "tokens": N, "heads": H, "replay_rel_err_fp32": errs,
            "step_eager_ms": t_eager * 1e3, "step_graph_ms": t_graph * 1e3}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", type=Path, default=Path("benchmarks/smollm2_config.json"))
    ap.add_argument("--json", type=Path, default=Path("results/gpu_check.json"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="small shapes (a CPU smoke run)")
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    name = torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"
    out: dict = {"device": name, "torch": torch.__version__}

    # 1. correctness of the chunked scan on the GPU, float64, with masks
    errs = {}
    for T in ((1, 37) if a.quick else (1, 37, 1000, 4096)):
        args = inputs(2, T, 2, 8, torch.float64, dev, seed=T)
        r_ref, s_ref = delta_rule_scan_reference(*args)
        r, s = delta_rule_scan_chunked(*args)
        errs[T] = max(((r - r_ref).norm() / r_ref.norm()).item(),
                      ((s - s_ref).norm() / s_ref.norm()).item())
    out["chunked_vs_loop_rel_err_fp64"] = errs

    # 2. time: loop vs chunked, float32, the default model's prefill shape
    rows = []
    for T in ((64,) if a.quick else (2048, 8192)):
        args = inputs(30, T, 1, 8, torch.float32, dev)
        t_loop = timed(delta_rule_scan_reference, *args, repeats=1)
        t_chunk = timed(delta_rule_scan_chunked, *args)
        rows.append({"T": T, "batch": 30, "loop_ms": t_loop * 1e3, "chunked_ms": t_chunk * 1e3,
                     "speedup": t_loop / t_chunk})
    out["scan_time"] = rows

    # 3. the engine's varlen pool scan in a CUDA graph
    if dev.type == "cuda":
        out["cuda_graph"] = graph_check(dev, a.quick)

    # 4. HF runtime on the GPU: forward with a state and backward through it
    from transformers import AutoModelForCausalLM, LlamaConfig

    from deltamem.adapter import new_adapter
    from deltamem.hf_runtime import DeltaMemHF

    cfg = LlamaConfig.from_json_file(a.config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(dev).eval()
    rt = DeltaMemHF(model, new_adapter(model, seed=0))
    params = list(rt.adapter.module.parameters())
    ids = torch.randint(0, cfg.vocab_size, (4, 32 if a.quick else 512), device=dev)

    def step():
        for p in params:
            p.grad = None
        _, state, _ = rt.forward(ids)
        read = ids[:, :64]
        logits, _, _ = rt.forward(read, state, torch.zeros(read.shape, dtype=torch.bool,
                                                           device=dev))
        logits.float().logsumexp(-1).mean().backward()

    t = timed(step, repeats=3)
    gnorm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params)).item()
    out["hf_train_step"] = {"batch": 4, "write_tokens": 512, "read_tokens": 64,
                            "seconds": t, "grad_norm": gnorm}

    print(f"device: {out['device']}, torch {out['torch']}")
    print("chunked vs loop (fp64 rel err):", {k: f"{v:.1e}" for k, v in errs.items()})
    print(f"{'T':>6s} {'loop ms':>10s} {'chunked ms':>11s} {'speed-up':>9s}")
    for r in rows:
        print(f"{r['T']:6d} {r['loop_ms']:10.1f} {r['chunked_ms']:11.2f} {r['speedup']:8.1f}x")
    if "cuda_graph" in out:
        cg = out["cuda_graph"]
        print(f"varlen pool scan, {cg['layers']} layers × {cg['tokens']} tokens, captured once, "
              f"replayed (fp32 rel err): "
              + ", ".join(f"{k} {v:.1e}" for k, v in cg["replay_rel_err_fp32"].items())
              + f"; step eager {cg['step_eager_ms']:.2f} ms, replayed "
              f"{cg['step_graph_ms']:.2f} ms")
    print(f"HF runtime train step (4×512 write + 4×64 read, fwd+bwd): {t * 1e3:.1f} ms, "
          f"grad norm {gnorm:.3g}")
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
