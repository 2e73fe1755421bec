"""`pmetal serve` under load beside sequential Hugging Face `generate`: requests/s and new tokens/s.

The server runs as users run it (`python -m pmetal serve`, its own process); `--clients` lists the
numbers of concurrent clients (threads, each with its own `openai` client) that each send
`--requests-per-client` chat requests back to back, greedy, `--max-tokens` new tokens at most
(answers may stop earlier at the end of the turn: tokens/s counts the tokens the server reports in
`usage`). The same load then goes to llama.cpp's own server (llama-cpp-python's `python -m llama_cpp.server`,
one request at a time) on the model exported by `pmetal export` to GGUF (`--llama-cpp-type`, f16 by
default; `none` skips it), temperature 0 without its default repeat penalty. The baseline answers the same prompts one at a time with `model.generate` (greedy, the
same budget, stopping at the same end-of-turn tokens) in this process, before the server starts,
so the two never share the machine. One untimed request warms each side up first.

    # CPU, the embedded SmolLM2-135M-Instruct
    python benchmarks/bench_serve.py --device cpu --model default --clients 1,8,32 --max-tokens 32 --threads 1
    # GPU (bf16 weights; the server keeps one captured round per batch shape)
    python benchmarks/bench_serve.py --device cuda --model default --clients 1,8,32 --max-tokens 128 \
        --requests-per-client 4 --hf-requests 16 --sync-every 4

Prints the table; `--markdown FILE` appends it as Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

from _common import report  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

TOPICS = ["the sea", "a red bicycle", "bread", "winter mornings", "a lighthouse", "owls", "trains", "the moon",
          "gardening", "chess", "rain", "a small village", "coffee", "mountains", "old maps", "bees"]


def prompts(count: int) -> list[str]:
    return [f"Write two sentences about {TOPICS[i % len(TOPICS)]} (#{i})." for i in range(count)]


def hf_sequential(args, texts: list[str]) -> tuple[float, int]:
    """(seconds, new tokens) for `texts` answered one by one with transformers' generate."""
    import torch

    from pmetal.generation import stop_token_ids
    from pmetal.models import load_model_and_tokenizer

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=dtype)
    model = model.to(args.device).eval()
    stops = stop_token_ids(tokenizer, model)

    def answer(text: str) -> int:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"].to(args.device)
        out = model.generate(ids, max_new_tokens=args.max_tokens, do_sample=False, eos_token_id=stops,
                             pad_token_id=tokenizer.pad_token_id)
        return out.shape[1] - ids.shape[1]

    with torch.no_grad():
        answer("Hello")  # warm-up
        start, tokens = time.perf_counter(), 0
        for text in texts:
            tokens += answer(text)
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, tokens


def start_server(args) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    proc = subprocess.Popen([sys.executable, "-m", "pmetal", "serve", "--model", args.model, "--port", str(port),
                             "--accelerator", args.device, "--max-concurrency", str(max(args.clients)),
                             "--sync-every", str(args.sync_every)], env=env)
    return proc, wait_until_serving(proc, f"http://127.0.0.1:{port}", "/health")


def served_load(url: str, clients: int, texts: list[str], max_tokens: int,
                extra_body: dict | None = None) -> tuple[float, int]:
    """(seconds, new tokens) for `clients` threads sharing `texts`, each request after the previous;
    `extra_body` adds server-specific request fields."""
    import openai

    parts = [texts[i::clients] for i in range(clients)]
    tokens = [0] * clients
    errors: list[BaseException] = []

    def client(i: int) -> None:
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=3600)
        try:
            for text in parts[i]:
                r = c.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": text}],
                                              temperature=0, max_tokens=max_tokens,
                                              extra_body=extra_body)
                tokens[i] += r.usage.completion_tokens
        except BaseException as e:  # noqa: BLE001 - reported after the threads join
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - start, sum(tokens)


MODEL_ID = "default"
# llama-cpp-python's server penalizes repeats by default (1.1); 1.0 makes its temperature-0 answers plain
# greedy decoding, as pmetal serve's are.
LLAMA_CPP_REQUEST = {"repeat_penalty": 1.0}


def export_gguf(args, out_dir: str) -> str:
    """The benchmark's model as a GGUF file of `--llama-cpp-type`, written by `pmetal export`."""
    path = os.path.join(out_dir, f"model-{args.llama_cpp_type}.gguf")
    kind = "--quantize" if args.llama_cpp_type.startswith("q") else "--dtype"
    subprocess.run([sys.executable, "-m", "pmetal", "export", args.model, "--format", "gguf", "--out", path,
                    kind, args.llama_cpp_type], check=True)
    return path


def start_llama_cpp_server(args, gguf: str) -> tuple[subprocess.Popen, str]:
    """llama-cpp-python's OpenAI-compatible server (`python -m llama_cpp.server`) on `gguf`, with the chat
    template the file carries. It answers one request at a time: concurrent clients queue."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threads = ["--n_threads", str(args.threads), "--n_threads_batch", str(args.threads)] if args.threads else []
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--model_alias", MODEL_ID,
                             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--verbose", "false",
                             *threads])
    return proc, wait_until_serving(proc, f"http://127.0.0.1:{port}", "/v1/models")


def wait_until_serving(proc: subprocess.Popen, url: str, path: str, timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(f"{url}{path}", timeout=2).read()
            return url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"the server did not start in {timeout:.0f} s")


def llama_cpp_rows(args) -> list[tuple]:
    """The same client load against llama.cpp's server on the model exported to GGUF: one row per
    number of clients."""
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-serve-gguf-") as out_dir:
        proc, url = start_llama_cpp_server(args, export_gguf(args, out_dir))
        try:
            served_load(url, 1, ["Hello"], args.max_tokens, LLAMA_CPP_REQUEST)  # warm-up
            for clients in args.clients:
                count = clients * args.requests_per_client
                seconds, tokens = served_load(url, clients, prompts(count), args.max_tokens, LLAMA_CPP_REQUEST)
                rows.append((f"llama.cpp server ({args.llama_cpp_type} GGUF)", clients, count, seconds, tokens))
        finally:
            proc.kill()
            proc.wait()
    return rows


def main() -> None:
    global MODEL_ID
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps"])
    p.add_argument("--clients", default="1,8,32", help="comma-separated numbers of concurrent clients")
    p.add_argument("--requests-per-client", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--hf-requests", type=int, default=8, help="requests the sequential baseline answers")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads on both sides (0: torch's default; 1 avoids oversubscribing a shared CPU)")
    p.add_argument("--sync-every", type=int, default=1, help="the server's --sync-every (decode rounds per device read)")
    p.add_argument("--llama-cpp-type", default="f16",
                   help="also serve the model with llama.cpp's server (llama-cpp-python), exported by `pmetal "
                        "export` as this GGUF type (f32, f16, bf16, q8_0, ...); 'none' skips it")
    p.add_argument("--markdown", default=None)
    args = p.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    MODEL_ID = args.model
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    seconds, tokens = hf_sequential(args, prompts(args.hf_requests))
    rows = [("HF generate, sequential", 1, args.hf_requests, seconds, tokens)]
    base_rps = args.hf_requests / seconds
    proc, url = start_server(args)
    try:
        served_load(url, 1, ["Hello"], args.max_tokens)  # warm-up
        for clients in args.clients:
            count = clients * args.requests_per_client
            seconds, tokens = served_load(url, clients, prompts(count), args.max_tokens)
            rows.append(("pmetal serve", clients, count, seconds, tokens))
    finally:
        proc.kill()
        proc.wait()
    if args.llama_cpp_type != "none":
        rows += llama_cpp_rows(args)
    header = ["contender", "clients", "requests", "seconds", "requests/s", "new tokens/s", "req/s vs HF"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += [f"| {name} | {c} | {n} | {s:.2f} | {n / s:.2f} | {t / s:.1f} | {n / s / base_rps:.2f}x |"
              for name, c, n, s, t in rows]
    title = f"serve: {args.model} on {args.device}, max_tokens {args.max_tokens}, sync every {args.sync_every}"
    report(title + "\n\n" + "\n".join(lines) + "\n", args.markdown)
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
