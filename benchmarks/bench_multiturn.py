"""Multi-turn benchmark (in the spirit of vLLM's benchmarks/multi_turn): N concurrent sessions
× M turns against the δ-mem server and plain vLLM, one run, the two servers one after the
other (never both at once), each started and stopped by this script.

- δ-mem: `deltamem serve` with its defaults (memory on), `--redis-url` on a private
  redis-server (no persistence: `--save "" --appendonly no`) on a free port, `--data-dir` a
  temporary folder. Each turn sends only the new user message with `session_id`.
- plain vLLM as people run it: `python -m vllm.entrypoints.openai.api_server --model DIR
  --dtype bfloat16 --max-model-len 8192`, its defaults otherwise (prefix caching on, default
  compilation), `VLLM_CPU_KVCACHE_SPACE=4` unless set, and without this project's vLLM plugin
  (`VLLM_PLUGINS` lists every other general plugin). The client re-sends the whole history
  each turn, as plain OpenAI clients do.

Each session is one person's days: user messages of about `--user-tokens` tokens (generated
sentences with names, places and numbers, deterministic per `--seed`), replies of at most
`--max-tokens`, temperature 0, streamed with `stream_options.include_usage`, sent with the
`openai` client (AsyncOpenAI). Turns run in lock-step: all N sessions do turn k concurrently,
then turn k+1, so each turn's numbers are comparable across servers. One warm-up round (N
short requests, not measured) precedes turn 1 on each server.

Per turn and server, over the N sessions: TTFT (request sent → first non-empty content
delta) and TPOT ((last content delta − first) / (completion tokens − 1), completion tokens
from `usage`): mean, p50, p90; and the whole run's p50/p90/p99 of both. `e2e` is request sent
→ end of stream (for δ-mem it includes the commit to the store, which comes after the last
token). For δ-mem, after each turn:
- commit bytes: Redis `INFO stats` `total_net_input_bytes` delta across the turn (this
  script's own INFO command subtracted) / N: what the server sent to Redis per session-turn,
  commands included; `read bytes` is the same for `total_net_output_bytes`;
- store bytes per session: `MEMORY USAGE key SAMPLES 0` summed over the session's keys
  (`dmem:{*/<session_id>}:*`), mean over the sessions;
- the session's `transcript_tokens` and `tokens_absorbed` from the stream's `session` object;
- at the end, each turn's `cached_tokens` and `new_epoch` from the sessions' turn logs
  (`GET /v1/sessions/{id}?full=true`), the Redis commands per turn (`INFO commandstats`) and
  the first session's keys field by field (JSON only).

    python benchmarks/bench_multiturn.py [--sessions 4] [--turns 30] [--max-tokens 48]
        [--only deltamem|vllm] [--json results/bench_multiturn.json] [--png PATH]

Prints tables, writes JSON (with the machine's description and the git commit served) and a
PNG (TTFT, commit bytes and store bytes against the turn number).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import (  # noqa: E402
    cpu_flags,
    free_port,
    git_info,
    loadavg,
    machine_info,
    plain_vllm,
    serve_and_run,
    stop_process,
    tail,
)

TABLE_TURNS = (1, 2, 3, 5, 10, 20, 30)
SERVERS = ("deltamem", "vllm")
LABEL = {"deltamem": "δ-mem", "vllm": "plain vLLM"}


def log(msg: str) -> None:
    print(f"[multiturn] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- conversations

NAMES = ["Ana", "Bruno", "Chiara", "Dmitri", "Elif", "Farid", "Greta", "Hiroshi", "Ines",
         "Jonas", "Kemal", "Lucia", "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa",
         "Samir", "Tove", "Umberto", "Vera", "Wojtek", "Yara", "Zeno"]
PLACES = ["Porto", "Lyon", "Graz", "Tartu", "Bergen", "Cadiz", "Ghent", "Krakow", "Bologna",
          "Aarhus", "Leeds", "Split", "Basel", "Nantes", "Utrecht", "Brno", "Turku", "Malaga"]
SPOTS = ["the bakery", "the harbour", "the library", "the market", "the station", "the gym",
         "the museum", "the old bridge", "the pharmacy", "the garden centre", "the cinema",
         "the post office", "the bike shop", "the dentist", "the town hall", "the bookshop"]
ITEMS = ["apples", "stamps", "candles", "notebooks", "batteries", "lemons", "postcards",
         "tea bags", "light bulbs", "oranges", "envelopes", "tomatoes", "pencils"]
FOODS = ["soup", "a sandwich", "pasta", "grilled fish", "rice with beans", "a salad",
         "dumplings", "an omelette", "lentil stew", "pancakes"]
RELATIONS = ["sister", "brother", "cousin", "neighbour", "colleague", "aunt", "friend"]


def _sentence(rng: random.Random, me: str) -> str:
    h, m = rng.randint(6, 21), rng.choice([0, 5, 10, 15, 20, 30, 40, 45, 50])
    t = f"{h}:{m:02d}"
    other, rel = rng.choice([n for n in NAMES if n != me]), rng.choice(RELATIONS)
    place, spot = rng.choice(PLACES), rng.choice(SPOTS)
    k = rng.randint(2, 19)
    return rng.choice([
        f"At {t} I took bus {rng.randint(3, 99)} to {spot} in {place} and paid "
        f"{rng.randint(2, 9)} euros.",
        f"My {rel} {other} called at {t} and told me the rent in {place} went up to "
        f"{rng.randint(6, 19) * 100} euros.",
        f"I bought {k} {rng.choice(ITEMS)} at {spot} for {k * rng.randint(1, 4)} euros.",
        f"For lunch I had {rng.choice(FOODS)} with {other} near {spot}.",
        f"{other} lent me {rng.randint(2, 12)} books and wants them back by the "
        f"{rng.randint(2, 28)}th.",
        f"In the evening I walked {rng.randint(3, 14)} kilometres along the river in {place}.",
        f"The train to {place} left at {t} from platform {rng.randint(1, 12)}, "
        f"{rng.randint(4, 35)} minutes late.",
        f"I met my {rel} {other} at {spot} at {t}; they are moving to {rng.choice(PLACES)} in "
        f"{rng.choice(['May', 'June', 'July', 'October', 'December'])}.",
        f"My room number at the hotel in {place} is {rng.randint(101, 999)}.",
        f"I paid {rng.randint(20, 300)} euros for new shoes and got a {k} percent discount.",
    ])


def make_messages(sessions: int, turns: int, user_tokens: int, seed: int, tokenizer
                  ) -> list[list[str]]:
    """Per session, `turns` user messages of about `user_tokens` tokens each (a sentence is
    added while the total stays closer to the target with it than without it)."""

    def ntok(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False).ids)

    convs = []
    for s in range(sessions):
        rng = random.Random(seed * 100_003 + s)
        me = NAMES[(seed + s) % len(NAMES)]
        msgs = []
        for k in range(1, turns + 1):
            text = f"Day {k}, {me} here."
            n = ntok(text)
            while True:
                cand = text + " " + _sentence(rng, me)
                m = ntok(cand)
                if n >= user_tokens or (m > user_tokens and m - user_tokens > user_tokens - n):
                    break
                text, n = cand, m
            msgs.append(text)
        convs.append(msgs)
    return convs


# --------------------------------------------------------------------------- processes

class Redis:
    """A private redis-server without persistence on a free loopback port."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def start(self) -> None:
        import redis

        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server not found on PATH")
        for _ in range(3):  # another process may take the probed port first
            self.port = free_port()
            self.proc = subprocess.Popen(
                [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
                 str(self.workdir), "--save", "", "--appendonly", "no", "--daemonize", "no",
                 "--logfile", str(self.workdir / "redis.log")],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True)
            self.client = redis.Redis(host="127.0.0.1", port=self.port)
            for _ in range(100):
                if self.proc.poll() is not None:
                    break
                try:
                    if self.client.ping():
                        return
                except redis.ConnectionError:
                    time.sleep(0.05)
            stop_process(self.proc, 5)
        raise RuntimeError("redis-server did not start:\n" + tail(self.workdir / "redis.log"))

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def net_bytes(self) -> tuple[int, int]:
        st = self.client.info("stats")
        return int(st["total_net_input_bytes"]), int(st["total_net_output_bytes"])

    def info_cost(self) -> tuple[int, int]:
        """Bytes one `INFO stats` adds to the counters (its own command; its reply is counted
        only after the reply is built)."""
        a = self.net_bytes()
        b = self.net_bytes()
        c = self.net_bytes()
        return b[0] - a[0], min(b[1] - a[1], c[1] - b[1])

    def session_bytes(self, session_id: str) -> tuple[int, list[str]]:
        keys = [k.decode() for k in self.client.scan_iter(match=f"*{session_id}*", count=1000)]
        keys = [k for k in keys if f"/{session_id}}}:" in k]
        total = sum(int(self.client.memory_usage(k, samples=0) or 0) for k in keys)
        return total, sorted(keys)

    def command_calls(self) -> dict[str, int]:
        """Calls per command so far (`INFO commandstats`)."""
        return {k.removeprefix("cmdstat_"): int(v["calls"])
                for k, v in self.client.info("commandstats").items()}

    def layout(self, session_id: str) -> dict:
        """What the session's keys hold: per key its type, MEMORY USAGE and the byte length
        of each hash field or list element (for the JSON; once, at the end)."""
        out = {}
        for key in self.session_bytes(session_id)[1]:
            kind = self.client.type(key).decode()
            item: dict = {"type": kind,
                          "memory_usage": int(self.client.memory_usage(key, samples=0) or 0)}
            if kind == "hash":
                item["field_bytes"] = {f.decode(): len(v)
                                       for f, v in self.client.hgetall(key).items()}
            elif kind == "list":
                item["element_bytes"] = [len(v) for v in self.client.lrange(key, 0, -1)]
            out[key] = item
        return out

    def stop(self) -> None:
        stop_process(self.proc, 10)


# --------------------------------------------------------------------------- client

async def one_request(client, model: str, messages: list[dict], max_tokens: int,
                      extra_body: dict | None) -> dict:
    t0 = time.perf_counter()
    first = last = None
    parts: list[str] = []
    usage = session = finish = None
    try:
        stream = await client.chat.completions.create(
            model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body=extra_body)
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.choices:
                ch = chunk.choices[0]
                if ch.delta is not None and ch.delta.content:
                    if first is None:
                        first = now
                    last = now
                    parts.append(ch.delta.content)
                if ch.finish_reason:
                    finish = ch.finish_reason
            if chunk.usage is not None:
                usage = chunk.usage
            extra = chunk.model_extra or {}
            if extra.get("session"):
                session = extra["session"]
    except Exception as e:  # record it; the turn counts as not done for this session
        return {"error": f"{type(e).__name__}: {e}"[:500], "t0": t0}
    end = time.perf_counter()
    ntok = usage.completion_tokens if usage is not None else None
    return {
        "text": "".join(parts),
        "ttft_s": None if first is None else first - t0,
        "tpot_s": (last - first) / (ntok - 1) if first is not None and ntok and ntok > 1
        else None,
        "e2e_s": end - t0,
        "after_last_token_s": None if last is None else end - last,
        "completion_tokens": ntok,
        "prompt_tokens": usage.prompt_tokens if usage is not None else None,
        "finish_reason": finish,
        "session": session,
    }


def pct(values: list[float], p: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no values."""
    v = sorted(values)
    if not v:
        return None
    x = (len(v) - 1) * p / 100
    lo, hi = math.floor(x), math.ceil(x)
    return v[lo] + (v[hi] - v[lo]) * (x - lo)


def summary(values: list[float | None], ps=(50, 90)) -> dict:
    v = [x for x in values if x is not None]
    out = {"n": len(v), "mean": statistics.fmean(v) if v else None}
    for p in ps:
        out[f"p{p}"] = pct(v, p)
    return out


async def run_turns(kind: str, url: str, a, convs: list[list[str]], redis: Redis | None
                    ) -> dict:
    import httpx
    from openai import AsyncOpenAI

    models = httpx.get(url + "/v1/models", timeout=30).json()
    model = models["data"][0]["id"]
    client = AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=900.0)
    n = len(convs)
    tag = f"mt{a.seed}"
    sids = [f"{tag}-s{i:03d}" for i in range(n)]
    history: list[list[dict]] = [[] for _ in range(n)]

    # Warm-up (first-request costs), not measured: short prompts, throwaway sessions.
    warm = await asyncio.gather(*[
        one_request(client, model, [{"role": "user", "content": f"Hello, I am {NAMES[i]}."}],
                    8, {"session_id": f"{tag}-warmup-{i}"} if kind == "deltamem" else None)
        for i in range(n)])
    if errs := [w["error"] for w in warm if "error" in w]:
        raise RuntimeError(f"{kind}: warm-up failed: {errs[0]}")

    info_cost = redis.info_cost() if redis else (0, 0)
    turns = []
    t_run = time.perf_counter()
    for k in range(1, a.turns + 1):
        reqs = []
        for i in range(n):
            msg = {"role": "user", "content": convs[i][k - 1]}
            if kind == "deltamem":
                reqs.append(one_request(client, model, [msg], a.max_tokens,
                                        {"session_id": sids[i]}))
            else:
                reqs.append(one_request(client, model, [*history[i], msg], a.max_tokens, None))
        calls0 = redis.command_calls() if redis else None
        before = redis.net_bytes() if redis else None
        t = time.perf_counter()
        res = await asyncio.gather(*reqs)
        wall = time.perf_counter() - t
        after = redis.net_bytes() if redis else None
        calls1 = redis.command_calls() if redis else None
        for i, r in enumerate(res):
            if "error" not in r:
                history[i] += [{"role": "user", "content": convs[i][k - 1]},
                               {"role": "assistant", "content": r["text"]}]
        row = {
            "turn": k, "wall_s": wall, "loadavg": loadavg(),
            "errors": [r["error"] for r in res if "error" in r],
            "ttft_s": summary([r.get("ttft_s") for r in res]),
            "tpot_s": summary([r.get("tpot_s") for r in res]),
            "e2e_s": summary([r.get("e2e_s") for r in res]),
            "after_last_token_s": summary([r.get("after_last_token_s") for r in res]),
            "prompt_tokens": summary([r.get("prompt_tokens") for r in res]),
            "completion_tokens": summary([r.get("completion_tokens") for r in res]),
            "sessions": [{k2: v for k2, v in r.items() if k2 not in ("text", "t0")}
                         for r in res],
        }
        if redis is not None:
            row["commit_bytes_per_session"] = (after[0] - before[0] - info_cost[0]) / n
            row["read_bytes_per_session"] = (after[1] - before[1] - info_cost[1]) / n
            # The server's commands in the turn (this script's own INFO calls left out).
            row["redis_calls"] = {c: calls1[c] - calls0.get(c, 0) for c in sorted(calls1)
                                  if c != "info" and calls1[c] != calls0.get(c, 0)}
            sizes = [redis.session_bytes(s) for s in sids]
            row["store_bytes_per_session"] = statistics.fmean(b for b, _ in sizes)
            row["store_keys_per_session"] = statistics.fmean(len(ks) for _, ks in sizes)
            row["redis_used_memory"] = int(redis.client.info("memory")["used_memory"])
            row["transcript_tokens"] = summary(
                [(r.get("session") or {}).get("transcript_tokens") for r in res])
            row["tokens_absorbed"] = summary(
                [(r.get("session") or {}).get("tokens_absorbed") for r in res])
        turns.append(row)
        msg = (f"{LABEL[kind]}: turn {k} of {a.turns}: TTFT mean "
               f"{fmt_ms(row['ttft_s']['mean'])} ms, TPOT mean {fmt_ms(row['tpot_s']['mean'])}"
               f" ms, prompt {fmt_n(row['prompt_tokens']['mean'])} tok")
        if redis is not None:
            msg += (f", commit {row['commit_bytes_per_session']:,.0f} B/session, store "
                    f"{row['store_bytes_per_session']:,.0f} B/session")
        msg += f", load {row['loadavg'][0] if row['loadavg'] else '-'}"
        if row["errors"]:
            msg += f", {len(row['errors'])} errors: {row['errors'][0]}"
        log(msg)
    run_s = time.perf_counter() - t_run
    await client.close()
    layout = redis.layout(sids[0]) if redis else None
    if kind == "deltamem":
        # Each turn's prompt-cache hit and epoch from the sessions' turn logs.
        for i, sid in enumerate(sids):
            try:
                view = httpx.get(f"{url}/v1/sessions/{sid}", params={"full": "true"},
                                 timeout=60).json()
            except (httpx.HTTPError, ValueError) as e:
                log(f"δ-mem: cannot read the turn log of {sid}: {e}")
                continue
            for entry in view.get("turn_log") or []:
                k = entry.get("turn")
                if isinstance(k, int) and 1 <= k <= len(turns):
                    turns[k - 1]["sessions"][i]["turn_log"] = entry
        for t in turns:
            logs = [r.get("turn_log") or {} for r in t["sessions"]]
            t["cached_tokens"] = summary([e.get("cached_tokens") for e in logs])
            t["new_epochs"] = sum(1 for e in logs if e.get("new_epoch"))

    allres = [r for t in turns for r in t["sessions"] if "error" not in r]
    overall = {m: summary([r.get(m) for r in allres], ps=(50, 90, 99))
               for m in ("ttft_s", "tpot_s", "e2e_s")}
    return {"model": model, "models_response": models, "session_ids": sids,
            "run_s": run_s, "errors": sum(len(t["errors"]) for t in turns),
            "overall": overall, "turns": turns,
            **({"store_layout_first_session": layout} if layout else {})}


# --------------------------------------------------------------------------- servers

def serve_and_turns(label: str, kind: str, cmd: list[str], work: Path, log_path: Path, a,
                    convs, redis, env: dict | None = None) -> dict:
    """One server's run of the sessions' turns (common.serve_and_run)."""
    return serve_and_run(label, cmd, lambda url, _pid: asyncio.run(run_turns(kind, url, a, convs, redis)),
                         cwd=work if kind == "vllm" else ROOT, log_path=log_path,
                         start_timeout=a.start_timeout, log=log, env=env)


def run_deltamem(a, convs, work: Path) -> dict:
    redis = Redis(work / "redis")
    redis.workdir.mkdir()
    redis.start()
    cmd = [sys.executable, "-m", "deltamem.cli", "serve", "--port", str(free_port()),
           "--data-dir", str(work / "data"), "--redis-url", redis.url]
    if a.model_given:
        cmd += ["--model", str(a.model)]
    cmd += shlex.split(a.deltamem_args)
    git = git_info()  # what the server process imports now
    try:
        res = serve_and_turns("δ-mem", "deltamem", cmd, work, work / "deltamem.log", a, convs,
                            redis)
    finally:
        redis.stop()
    res["server"].update({"redis": "private redis-server, --save '' --appendonly no",
                          "git_at_start": git, "git_at_end": git_info()})
    return res


def run_vllm(a, convs, work: Path) -> dict:
    cmd, env = plain_vllm(a.model, free_port(), "bfloat16",
                          ["--max-model-len", "8192", *shlex.split(a.vllm_args)])
    res = serve_and_turns("plain vLLM", "vllm", cmd, work, work / "vllm.log", a, convs, None,
                        env)
    res["server"]["env"] = {k: env[k] for k in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_PLUGINS")}
    return res


# --------------------------------------------------------------------------- report

def fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{1000 * v:.0f}"


def fmt_n(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def mean_ttft(res: dict | None, lo: int, hi: int) -> float | None:
    if not res:
        return None
    v = [t["ttft_s"]["mean"] for t in res["turns"]
         if lo <= t["turn"] <= hi and t["ttft_s"]["mean"] is not None]
    return statistics.fmean(v) if v else None


def report(results: dict, a) -> tuple[str, dict]:
    d, v = results.get("deltamem"), results.get("vllm")
    shown = [k for k in TABLE_TURNS if k <= a.turns]
    if a.turns not in shown:
        shown.append(a.turns)
    lines = []

    def trip(s: dict) -> str:
        return f"{fmt_ms(s['mean'])}/{fmt_ms(s['p50'])}/{fmt_ms(s['p90'])}"

    lines.append(f"latency per turn (ms, mean/p50/p90 over {a.sessions} sessions; prompt: "
                 "mean prompt tokens; load: 1-minute load average after the turn)")
    hdr = f"{'turn':>4s}"
    for kind in SERVERS:
        if results.get(kind):
            lab = "δ-mem" if kind == "deltamem" else "vLLM"
            hdr += f" | {lab + ' TTFT':>17s} {lab + ' TPOT':>14s} {'prompt':>6s} {'load':>4s}"
    if d and v:
        hdr += f" | {'TTFT δ/vLLM':>11s}"
    lines += [hdr, "-" * len(hdr)]
    for k in shown:
        row = f"{k:>4d}"
        for kind in SERVERS:
            if r := results.get(kind):
                t = r["turns"][k - 1]
                load = f"{t['loadavg'][0]:.1f}" if t.get("loadavg") else "-"
                row += (f" | {trip(t['ttft_s']):>17s} {trip(t['tpot_s']):>14s} "
                        f"{fmt_n(t['prompt_tokens']['mean']):>6s} {load:>4s}")
        if d and v:
            dm, vm = d["turns"][k - 1]["ttft_s"]["mean"], v["turns"][k - 1]["ttft_s"]["mean"]
            row += f" | {dm / vm:>10.2f}×" if dm and vm else f" | {'-':>11s}"
        lines.append(row)

    if d:
        lines += ["", "δ-mem store per turn (Redis; bytes per session; cached tok: mean prompt "
                  "tokens from the prefix cache, new epochs: sessions whose window was re-read, "
                  "both from the turn logs)"]
        hdr = (f"{'turn':>4s} | {'commit B/turn':>13s} {'read B/turn':>11s} "
               f"{'store B':>9s} {'keys':>4s} {'transcript tok':>14s} {'absorbed':>8s} "
               f"{'after last tok ms':>17s} {'cached tok':>10s} {'new epochs':>10s}")
        lines += [hdr, "-" * len(hdr)]
        for k in shown:
            t = d["turns"][k - 1]
            lines.append(
                f"{k:>4d} | {t['commit_bytes_per_session']:>13,.0f} "
                f"{t['read_bytes_per_session']:>11,.0f} {t['store_bytes_per_session']:>9,.0f} "
                f"{t['store_keys_per_session']:>4.0f} {fmt_n(t['transcript_tokens']['mean']):>14s}"
                f" {fmt_n(t['tokens_absorbed']['mean']):>8s} "
                f"{fmt_ms(t['after_last_token_s']['mean']):>17s} "
                f"{fmt_n((t.get('cached_tokens') or {}).get('mean')):>10s} "
                f"{t.get('new_epochs', '-'):>10}")

    lines += ["", "whole run (ms, over all session-turns): p50/p90/p99"]
    for kind in SERVERS:
        if r := results.get(kind):
            o = r["overall"]
            lines.append(
                f"  {LABEL[kind]:11s} TTFT {fmt_ms(o['ttft_s']['p50'])}/"
                f"{fmt_ms(o['ttft_s']['p90'])}/{fmt_ms(o['ttft_s']['p99'])}  TPOT "
                f"{fmt_ms(o['tpot_s']['p50'])}/{fmt_ms(o['tpot_s']['p90'])}/"
                f"{fmt_ms(o['tpot_s']['p99'])}  e2e {fmt_ms(o['e2e_s']['p50'])}/"
                f"{fmt_ms(o['e2e_s']['p90'])}/{fmt_ms(o['e2e_s']['p99'])}  "
                f"({r['run_s']:.0f} s, {r['errors']} errors)")

    lo, hi = max(1, a.turns - 4), a.turns
    s: dict = {"last_turns": [lo, hi]}
    s["deltamem_ttft_last_turns_s"] = mean_ttft(d, lo, hi)
    s["vllm_ttft_last_turns_s"] = mean_ttft(v, lo, hi)
    dl, vl = s["deltamem_ttft_last_turns_s"], s["vllm_ttft_last_turns_s"]
    s["ttft_last_turns_ratio_deltamem_over_vllm"] = dl / vl if dl and vl else None
    if d and a.turns >= 3:
        s["deltamem_ttft_turn3_s"] = d["turns"][2]["ttft_s"]["mean"]
        t3 = s["deltamem_ttft_turn3_s"]
        s["deltamem_ttft_last_turns_over_turn3"] = dl / t3 if dl and t3 else None
    if d:
        k10 = min(10, a.turns)
        s["deltamem_commit_bytes_turn"] = {
            k10: d["turns"][k10 - 1]["commit_bytes_per_session"],
            a.turns: d["turns"][-1]["commit_bytes_per_session"]}
        s["deltamem_store_bytes_per_session_last_turn"] = d["turns"][-1][
            "store_bytes_per_session"]

    lines += ["", "summary"]
    lines.append(f"  mean TTFT, turns {lo}–{hi}: δ-mem {fmt_ms(dl)} ms, plain vLLM "
                 f"{fmt_ms(vl)} ms" + (f", δ-mem/vLLM {dl / vl:.2f}×" if dl and vl else ""))
    if s.get("deltamem_ttft_turn3_s") is not None:
        r3 = s["deltamem_ttft_last_turns_over_turn3"]
        lines.append(f"  δ-mem TTFT turn 3: {fmt_ms(s['deltamem_ttft_turn3_s'])} ms; turns "
                     f"{lo}–{hi} / turn 3: " + ("-" if r3 is None else f"{r3:.2f}×"))
    if d:
        cb = s["deltamem_commit_bytes_turn"]
        lines.append("  δ-mem commit bytes per session-turn: "
                     + ", ".join(f"turn {k}: {b:,.0f} B" for k, b in cb.items()))
        lines.append(f"  δ-mem store bytes per session at turn {a.turns}: "
                     f"{s['deltamem_store_bytes_per_session_last_turn']:,.0f} B")
    return "\n".join(lines), s


def plot(results: dict, path: Path, a) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = results.get("deltamem")
    npanels = 3 if d else 1
    fig, axes = plt.subplots(1, npanels, figsize=(5.2 * npanels, 4.2), squeeze=False)
    ax = axes[0][0]
    for kind, color in (("deltamem", "tab:blue"), ("vllm", "tab:orange")):
        if r := results.get(kind):
            ks = [t["turn"] for t in r["turns"]]
            ax.plot(ks, [1000 * (t["ttft_s"]["mean"] or math.nan) for t in r["turns"]],
                    marker=".", color=color, label=f"{LABEL[kind]} (mean)")
            ax.plot(ks, [1000 * (t["ttft_s"]["p90"] or math.nan) for t in r["turns"]],
                    ls=":", color=color, label=f"{LABEL[kind]} (p90)")
    ax.set(xlabel="turn", ylabel="TTFT (ms)",
           title=f"TTFT, {a.sessions} concurrent sessions")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if d:
        ks = [t["turn"] for t in d["turns"]]
        ax = axes[0][1]
        ax.plot(ks, [t["commit_bytes_per_session"] / 1000 for t in d["turns"]], marker=".",
                label="sent to Redis (commit)")
        ax.plot(ks, [t["read_bytes_per_session"] / 1000 for t in d["turns"]], marker=".",
                ls="--", label="read from Redis (load)")
        ax.set(xlabel="turn", ylabel="kB per session-turn", title="δ-mem Redis traffic")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax = axes[0][2]
        ax.plot(ks, [t["store_bytes_per_session"] / 1000 for t in d["turns"]], marker=".",
                color="tab:green")
        ax.set(xlabel="turn", ylabel="kB (MEMORY USAGE)", title="δ-mem store per session")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.suptitle(f"multi-turn: {a.model.name}, {a.sessions} sessions × {a.turns} turns, "
                 f"~{a.user_tokens} user tok, {a.max_tokens} reply tok", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=4, help="concurrent sessions (N)")
    ap.add_argument("--turns", type=int, default=30, help="turns per session (M)")
    ap.add_argument("--max-tokens", type=int, default=48, help="reply tokens (at most)")
    ap.add_argument("--user-tokens", type=int, default=60, help="tokens per user message")
    ap.add_argument("--only", choices=SERVERS, default=None, help="run one server only")
    ap.add_argument("--seed", type=int, default=0, help="conversation text seed")
    ap.add_argument("--model", type=Path, default=None,
                    help="backbone folder (default: the project's default model)")
    ap.add_argument("--deltamem-args", default="", help="extra args for deltamem serve")
    ap.add_argument("--vllm-args", default="", help="extra args for the vLLM api_server")
    ap.add_argument("--start-timeout", type=float, default=420,
                    help="seconds to wait for a server's /health")
    ap.add_argument("--json", type=Path, default=Path("results/bench_multiturn.json"))
    ap.add_argument("--png", type=Path, default=None, help="default: next to the JSON")
    a = ap.parse_args(argv)
    if a.sessions < 1 or a.turns < 1 or a.max_tokens < 1 or a.user_tokens < 1:
        ap.error("--sessions, --turns, --max-tokens and --user-tokens must be positive")
    a.png = a.png or a.json.with_suffix(".png")

    from tokenizers import Tokenizer

    from deltamem.model_fetch import resolve_model

    a.model_given = a.model is not None
    a.model = Path(resolve_model(str(a.model) if a.model else None))
    tok = Tokenizer.from_file(str(a.model / "tokenizer.json"))
    convs = make_messages(a.sessions, a.turns, a.user_tokens, a.seed, tok)
    user_tok = [len(tok.encode(m, add_special_tokens=False).ids) for c in convs for m in c]
    log(f"{a.sessions} sessions × {a.turns} turns, user messages {min(user_tok)}–"
        f"{max(user_tok)} tokens (mean {statistics.fmean(user_tok):.1f}), replies ≤ "
        f"{a.max_tokens} tokens; example: {convs[0][0]!r}")

    # SIGTERM (a plain `kill`) unwinds like Ctrl-C, so the servers and Redis are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    load0 = loadavg()
    if load0 and load0[0] > 0.5 * (os.cpu_count() or 1):
        log(f"load average {load0} at the start: other work is running, numbers will be noisy")
    results: dict = {}
    kinds = [a.only] if a.only else list(SERVERS)
    with tempfile.TemporaryDirectory(prefix="bench-multiturn-") as tmp:
        for kind in kinds:  # one server at a time
            work = Path(tmp) / kind
            work.mkdir()
            results[kind] = (run_deltamem if kind == "deltamem" else run_vllm)(a, convs, work)

    text, summ = report(results, a)
    machine = machine_info()
    machine["cpu_flags"] = cpu_flags()
    print(f"\nmulti-turn benchmark: {a.model.name}, {a.sessions} sessions × {a.turns} turns, "
          f"~{statistics.fmean(user_tok):.0f}-token user messages, replies ≤ {a.max_tokens} "
          f"tokens, temperature 0, streamed; {machine['cpu_model']}, {machine['cpu_count']} "
          f"cores, load avg {loadavg()}")
    if d := results.get("deltamem"):
        g = d["server"]["git_at_start"]
        print(f"δ-mem at {g['commit']}"
              + (f", uncommitted: {' '.join(g['uncommitted_server_memory_store_deltamem'])}"
                 if g["uncommitted_server_memory_store_deltamem"] else ", clean tree"))
    print(text)
    doc = {"benchmark": "multiturn", "model": a.model.name,
           "settings": {k: (str(x) if isinstance(x, Path) else x) for k, x in vars(a).items()},
           "user_tokens_actual": {"mean": statistics.fmean(user_tok), "min": min(user_tok),
                                  "max": max(user_tok)},
           "machine": machine, "summary": summ, "results": results,
           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(doc, indent=2, default=str))
    plot(results, a.png, a)
    print(f"wrote {a.json} and {a.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
