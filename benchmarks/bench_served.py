"""Served throughput: the δ-mem server against plain vLLM's OpenAI server as people run it, over
real HTTP with the `openai` client, the servers one after another in one run (never two at
once), each started and stopped by this script:

- `vllm`: `python -m vllm.entrypoints.openai.api_server --model DIR --dtype D`, its defaults
  otherwise (default compilation, prefix caching on), without this project's plugin;
- `nomem`: `deltamem serve --no-memory --dtype D` (the δ-mem server with the memory off);
- `deltamem`: `deltamem serve --dtype D` (memory on, the shipped adapter for the default model);
- `deltamem-1h`: the same with an untrained adapter of the paper's shape,
  one 8×8 state per layer (TSW): what the memory costs at that size (the cost does not depend
  on the weights' values).

D is the same for all three: `--dtype auto` (the default) resolves as `deltamem serve` does
(bfloat16, or float32 on a CPU without native bfloat16) and is passed to each explicitly.

Workload, sessionless chat completions, temperature 0, `ignore_eos` (so every reply has its
full length), prompts distinct per request (no prefix-cache hits):
- decode, 1 stream and N concurrent (default 16): short prompts, G tokens each (default 128),
  streamed; throughput = completion tokens / wall time, best of R rounds;
- prefill: one user message of P tokens (default 2,048 with the chat template), max_tokens 1;
  time to the response, median of R.

And, over the 1-stream rounds, the CPU time per completion token of the server's API process
and of its engine processes: what the API layer costs, apart from the machine's noise.

With `--passes N` every server runs N times, in turn, and each keeps its best pass.

Prints a table with each server's ratio to plain vLLM and writes JSON (machine, commands,
start-up times, every round).

    python benchmarks/bench_served.py [--servers vllm,nomem,deltamem,deltamem-1h]
        [--concurrency 16]
        [--json results/bench_served.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import (  # noqa: E402
    cpu_flags,
    cpu_seconds,
    free_port,
    git_info,
    loadavg,
    machine_info,
    plain_vllm,
    serve_and_run,
)

SERVERS = ("vllm", "nomem", "deltamem", "deltamem-1h")
LABEL = {"vllm": "plain vLLM", "nomem": "δ-mem --no-memory", "deltamem": "δ-mem",
         "deltamem-1h": "δ-mem, 1 head"}
WORDS = ("river morning garden letter window yellow quiet market bridge coffee winter "
         "station paper music orange travel doctor friend summer kitchen number island "
         "village mountain forest silver candle harbour pencil ticket").split()


def log(msg: str) -> None:
    print(f"[served] {msg}", file=sys.stderr, flush=True)


def text_of(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


async def one(client, model: str, text: str, max_tokens: int, stream: bool) -> dict:
    """One chat completion; times of submission, first content and end, completion tokens."""
    t0 = time.perf_counter()
    kw = dict(model=model, messages=[{"role": "user", "content": text}], temperature=0,
              max_tokens=max_tokens, extra_body={"ignore_eos": True})
    if not stream:
        r = await client.chat.completions.create(**kw)
        end = time.perf_counter()
        return {"t0": t0, "first": end, "end": end, "tokens": r.usage.completion_tokens,
                "prompt_tokens": r.usage.prompt_tokens}
    first, usage = None, None
    s = await client.chat.completions.create(**kw, stream=True,
                                             stream_options={"include_usage": True})
    async for chunk in s:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter()
        if chunk.usage is not None:
            usage = chunk.usage
    return {"t0": t0, "first": first, "end": time.perf_counter(),
            "tokens": usage.completion_tokens, "prompt_tokens": usage.prompt_tokens}


async def workload(url: str, a, prefill_words: int, pid: int) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="none", timeout=600, max_retries=0)
    model = (await client.models.list()).data[0].id
    rng = random.Random(0)  # the same prompts for every server
    res: dict = {}
    # Warm-up (first-call costs), not measured.
    await asyncio.gather(*[one(client, model, text_of(rng, 12), 8, True) for _ in range(4)])
    await one(client, model, text_of(rng, 200), 1, False)

    for name, n in (("decode_1", 1), (f"decode_{a.concurrency}", a.concurrency)):
        rounds = []
        cpu0 = cpu_seconds(pid)
        for _ in range(a.decode_repeats):  # best of R: a busy machine only ever slows a run
            texts = [text_of(rng, 12) for _ in range(n)]
            t = time.perf_counter()
            out = await asyncio.gather(*[one(client, model, x, a.gen_tokens, True)
                                         for x in texts])
            wall = time.perf_counter() - t
            tokens = sum(o["tokens"] for o in out)
            if tokens != n * a.gen_tokens:
                raise RuntimeError(f"{name}: {tokens} tokens, not {n * a.gen_tokens}")
            itl = statistics.median((o["end"] - o["first"]) / max(1, o["tokens"] - 1)
                                    for o in out)
            rounds.append({"tok_per_s": tokens / wall, "wall_s": wall,
                           "median_inter_token_ms": 1000 * itl})
        cpu1 = cpu_seconds(pid)
        # CPU per completion token, the API process apart from the engine's: what the API
        # layer costs, told apart from the machine's noise (which moves tok/s, not this).
        cpu = {k: round(1000 * (cpu1[k] - cpu0[k]) / (n * a.gen_tokens * len(rounds)), 3)
               for k in cpu0}
        best = max(rounds, key=lambda r: r["tok_per_s"])
        res[name] = {"requests": n, "tokens_each": a.gen_tokens, **_rounded(best),
                     "tok_per_s_rounds": [round(r["tok_per_s"], 2) for r in rounds],
                     "cpu_ms_per_token": cpu}
        runs = ", ".join(f"{r['tok_per_s']:.1f}" for r in rounds)
        log(f"  {name}: {best['tok_per_s']:.1f} tok/s (rounds: {runs}); CPU per token "
            f"{cpu['api']:.2f} ms API, {cpu['engine']:.1f} ms engine")

    times, prompt_tokens = [], []
    for _ in range(a.prefill_repeats):
        o = await one(client, model, text_of(rng, prefill_words), 1, False)
        times.append(o["end"] - o["t0"])
        prompt_tokens.append(o["prompt_tokens"])
    t = statistics.median(times)
    res["prefill"] = {"prompt_tokens": prompt_tokens, "times_s": [round(x, 3) for x in times],
                      "median_s": round(t, 3),
                      "tok_per_s": round(statistics.median(prompt_tokens) / t, 1)}
    log(f"  prefill {statistics.median(prompt_tokens):.0f} tokens: median {t:.2f} s")
    await client.close()
    return res


def _rounded(d: dict) -> dict:
    return {k: round(v, 3) for k, v in d.items()}


def prefill_words_for(model: Path, tokens: int) -> int:
    """Words of `text_of` that make a chat prompt of about `tokens` tokens."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    sample = text_of(random.Random(1), 1000)
    per_word = len(tok.encode(sample, add_special_tokens=False).ids) / 1000
    return max(1, int((tokens - 30) / per_word))  # ~30 tokens of chat template


def run_server(kind: str, a, work: Path, prefill_words: int) -> dict:
    port = free_port()
    if kind == "vllm":
        cmd, env = plain_vllm(a.model, port, a.dtype, shlex.split(a.vllm_args))
        cwd = work
    else:
        cmd = [sys.executable, "-m", "deltamem.cli", "serve", "--port", str(port),
               "--data-dir", str(work / "data"), "--dtype", a.dtype]
        if a.model_given:
            cmd += ["--model", str(a.model)]
        if kind == "nomem":
            cmd.append("--no-memory")
        if kind == "deltamem-1h":
            from deltamem.adapter import new_adapter_from_checkpoint, save_adapter

            one = save_adapter(new_adapter_from_checkpoint(a.model, seed=0, num_state_heads=1),
                               work / "adapter-1h")
            cmd += ["--adapter", str(one)]
        cmd += shlex.split(a.deltamem_args)
        env, cwd = None, ROOT
    return serve_and_run(LABEL[kind], cmd,
                         lambda url, pid: asyncio.run(workload(url, a, prefill_words, pid)),
                         cwd=cwd, log_path=work / f"{kind}.log", start_timeout=a.start_timeout,
                         log=log, env=env)


def best_of(runs: list[dict]) -> dict:
    """One server's passes: each throughput its best pass's (a busy machine only ever slows a
    run), start-up the shortest; every pass kept under "passes"."""
    out = {k: max((r[k] for r in runs), key=lambda m: m["tok_per_s"])
           for k in runs[0] if k != "server"}
    out["server"] = min((r["server"] for r in runs), key=lambda m: m["start_s"])
    out["passes"] = runs
    return out


def report(results: dict, a) -> tuple[str, dict]:
    rows = [("decode_1", "tok_per_s", "decode, 1 stream (tok/s)"),
            (f"decode_{a.concurrency}", "tok_per_s",
             f"decode, {a.concurrency} streams × {a.gen_tokens} (tok/s)"),
            ("prefill", "tok_per_s", f"prefill, ~{a.prefill_tokens} tokens (tok/s)"),
            ("server", "start_s", "start-up (s)")]
    kinds = [k for k in SERVERS if k in results]
    head = f"{'metric':34s}" + "".join(f"{LABEL[k]:>20s}" for k in kinds)
    lines = [head]
    ratios: dict = {}
    base = results.get("vllm")
    for sec, field, label in rows:
        cells = []
        for k in kinds:
            v = results[k][sec][field]
            cell = f"{v:.1f}"
            if base is not None and k != "vllm" and base[sec][field]:
                r = v / base[sec][field]
                ratios.setdefault(k, {})[f"{sec}.{field}"] = round(r, 3)
                cell += f" ({r:.2f}×)"
            cells.append(f"{cell:>20s}")
        lines.append(f"{label:34s}" + "".join(cells))
    for part, label in (("api", "API CPU per token, 1 stream (ms)"),
                        ("engine", "engine CPU per token, 1 stream (ms)")):
        lines.append(f"{label:34s}" + "".join(
            f"{results[k]['decode_1']['cpu_ms_per_token'][part]:>20.2f}" for k in kinds))
    return "\n".join(lines), ratios


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--servers", default=",".join(SERVERS),
                    help=f"comma list of {', '.join(SERVERS)} (run in that order)")
    ap.add_argument("--model", type=Path, default=None,
                    help="backbone folder (default: the project's default model)")
    ap.add_argument("--dtype", default="auto",
                    help="dtype of all three servers (default auto: as deltamem serve resolves "
                    "it on this machine)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--prefill-tokens", type=int, default=2048)
    ap.add_argument("--prefill-repeats", type=int, default=3, help="prefill: median of R")
    ap.add_argument("--decode-repeats", type=int, default=2, help="decode: best of R")
    ap.add_argument("--passes", type=int, default=1,
                    help="run every server this many times, in turn, and keep each one's best "
                    "(servers of one pass differ by about ±10%% on a shared 2-core machine)")
    ap.add_argument("--deltamem-args", default="", help="extra args for deltamem serve")
    ap.add_argument("--vllm-args", default="", help="extra args for the vLLM api_server")
    ap.add_argument("--start-timeout", type=float, default=600,
                    help="seconds to wait for a server's /health")
    ap.add_argument("--json", type=Path, default=Path("results/bench_served.json"))
    a = ap.parse_args(argv)
    kinds = [k.strip() for k in a.servers.split(",") if k.strip()]
    if not kinds or not set(kinds) <= set(SERVERS):
        ap.error(f"--servers takes {', '.join(SERVERS)}")

    from deltamem.model_fetch import resolve_model
    from server.engine.build import resolve_dtype

    a.model_given = a.model is not None
    a.model = Path(resolve_model(str(a.model) if a.model else None))
    a.dtype = resolve_dtype(a.dtype)
    prefill_words = prefill_words_for(a.model, a.prefill_tokens)
    git = git_info()
    with tempfile.TemporaryDirectory(prefix="bench-served-") as tmp:
        passes: dict[str, list[dict]] = {k: [] for k in kinds}
        for n in range(a.passes):
            # Every pass runs every server again, in turn: slow drifts of the machine (other
            # tenants, clock) then touch all of them, not one.
            for kind in kinds:
                work = Path(tmp) / f"{kind}-{n}"
                work.mkdir()
                log(f"pass {n + 1} of {a.passes}")
                passes[kind].append(run_server(kind, a, work, prefill_words))
        results = {k: best_of(v) for k, v in passes.items()}

    text, ratios = report(results, a)
    machine = machine_info()
    machine["cpu_flags"] = cpu_flags()
    print(f"\nserved throughput: {a.model.name}, {a.dtype}, {machine['cpu_model']}, "
          f"{machine['cpu_count']} cores, load avg {loadavg()}; δ-mem at {git['commit']}"
          + (" (uncommitted changes)" if git["uncommitted_server_memory_store_deltamem"]
             else ""))
    print(text)
    doc = {"benchmark": "served", "model": a.model.name, "dtype": a.dtype,
           "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
           "machine": machine, "git": git, "results": results, "ratios_over_vllm": ratios,
           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(doc, indent=2))
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
